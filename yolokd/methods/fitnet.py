"""FitNets (Romero et al., ICLR 2015, arXiv:1412.6550): hints on the three neck levels, plus the paper's KD stage.

- Hint term L_HT (Eq. 3), column `fitnet_ht`: weight * mean_l mean_{b,c,h,w} (X^t_l - r_l(X^s_l))^2, with r_l the
  regressor (`projector`, see yolokd/adapters.py): "conv", a 1x1 convolution (identity when widths match), or
  "branch", a 3x3 conv + BN + SiLU and a 1x1 conv. The paper's regressor is a convolution followed by the hint
  layer's own non-linearity (Sec. 2.2). Deviation: the paper sums over elements and uses one hint layer; here a
  mean per level (scale-free across image sizes and model widths), averaged over P3-P5.
- KD term L_KD (Algorithm 1, stage 2: Eq. 2's lambda * H(P_T^tau, P_S^tau)), column `fitnet_kd`: kd_weight * the
  soft class targets of a sigmoid head (`soft_class_kd`, the same term as `ld`'s class term, tau = 1). It is on
  the task loss's scale, so `kd_max_ratio` leaves it alone (`task_scaled`); the hint term stays capped.
- Stages: the paper trains with the hint first (stage 1), then with KD (stage 2). `hint_share` is the share of the
  epochs with the hint; the KD term acts throughout, so 1 (the default) runs both from the first step, as one
  Ultralytics run. On the 8-epoch CPU profile `hint_share: 0.5` gained +0.001 over 1 on two seeds, within noise.

Measured there (docs/experiments.md, fourth round): the hint alone (`kd_weight: 0`) is level with the plain student
over 10 seeds; with the KD stage FitNets is well above it, and the KD term alone is above both, so on this profile
the hint costs a little.

`pearson: true` standardises both maps per channel over the batch and positions before the MSE, as PKD does (Cao
et al., NeurIPS 2022, arXiv:2207.02039, Sec. 3.2): the loss becomes 2 * (1 - Pearson correlation) per channel, blind
to each channel's scale and offset, so no channel or level dominates by magnitude.
"""

from __future__ import annotations

import torch

from yolokd.adapters import PROJECTORS, level_aligners
from yolokd.methods._common import prepare, soft_class_kd
from yolokd.methods.base import DistillMethod, StepContext, check_choice, register
from yolokd.taps import Features


def standardise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PKD's normalisation: each channel of (B, C, H, W) to zero mean and unit variance over (B, H, W)."""
    mean = x.mean((0, 2, 3), keepdim=True)
    return (x - mean) / (x.var((0, 2, 3), unbiased=False, keepdim=True) + eps).sqrt()


@register
class FitNet(DistillMethod):
    name = "fitnet"
    summary = ("FitNets: MSE between teacher neck features and regressed (1x1-adapted) student neck features, "
               "plus the paper's soft-target KD on the class scores")
    aligned = {"align": "neck"}
    choices = {"projector": PROJECTORS}
    task_scaled = frozenset({"kd"})  # the KD term has the cls loss's scale; the hint term is capped

    def __init__(self, student: Features, teacher: Features, *, weight: float, kd_weight: float, hint_share: float,
                 projector: str, pearson: bool):
        super().__init__()
        self.weight, self.kd_weight, self.hint_share, self.pearson = weight, kd_weight, hint_share, bool(pearson)
        check_choice("fitnet_projector", projector, PROJECTORS)
        self.align = level_aligners(student.neck, teacher.neck, projector)

    def forward(self, s: Features, t: Features, ctx: StepContext) -> dict[str, torch.Tensor]:
        norm = standardise if self.pearson else (lambda x: x)
        per_level = []
        for a, xs, xt in zip(self.align, s.neck, t.neck):
            error = (norm(a(xs)) - norm(xt)).pow(2)  # Eq. 3 per element; its mean is the level's hint loss
            self.record("hint_error", error)
            per_level.append(error.mean())
        in_hint_stage = ctx.epoch < self.hint_share * ctx.epochs
        terms = {"ht": (self.weight if in_hint_stage else 0.0) * torch.stack(per_level).mean()}
        if self.kd_weight:
            s, t = prepare(s, t)
            terms["kd"] = self.kd_weight * soft_class_kd(t.scores, s.scores)[0]
        return terms
