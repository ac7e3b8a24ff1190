"""FitNets hints (Romero et al., ICLR 2015, arXiv:1412.6550, Eq. 3), on the three neck levels.

L = weight * mean_l mean_{b,c,h,w} (X^t_l - r_l(X^s_l))^2, with r_l the regressor (`projector`, see
yolokd/adapters.py): "conv", a 1x1 convolution (identity when widths match), or "branch", a 3x3 conv + BN + SiLU and
a 1x1 conv. The paper's regressor is a convolution followed by the hint layer's own non-linearity (Sec. 2.2).
Deviation: the paper sums over elements and uses one hint layer; here a mean per level (scale-free across image
sizes and model widths), averaged over P3-P5. The textbook baseline every other method should beat.

`pearson: true` standardises both maps per channel over the batch and positions before the MSE, as PKD does (Cao
et al., NeurIPS 2022, arXiv:2207.02039, Sec. 3.2): the loss becomes 2 * (1 - Pearson correlation) per channel, blind
to each channel's scale and offset, so no channel or level dominates by magnitude.
"""

from __future__ import annotations

import torch

from yolokd.adapters import PROJECTORS, level_aligners
from yolokd.methods.base import DistillMethod, StepContext, check_choice, register
from yolokd.taps import Features


def standardise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PKD's normalisation: each channel of (B, C, H, W) to zero mean and unit variance over (B, H, W)."""
    mean = x.mean((0, 2, 3), keepdim=True)
    return (x - mean) / (x.var((0, 2, 3), unbiased=False, keepdim=True) + eps).sqrt()


@register
class FitNet(DistillMethod):
    name = "fitnet"
    summary = "FitNets: plain MSE between teacher neck features and regressed (1x1-adapted) student neck features"
    aligned = {"align": "neck"}
    choices = {"projector": PROJECTORS}

    def __init__(self, student: Features, teacher: Features, *, weight: float, projector: str = "conv",
                 pearson: bool = False):
        super().__init__()
        self.weight, self.pearson = weight, bool(pearson)
        check_choice("fitnet_projector", projector, PROJECTORS)
        self.align = level_aligners(student.neck, teacher.neck, projector)

    def forward(self, s: Features, t: Features, ctx: StepContext) -> dict[str, torch.Tensor]:
        norm = standardise if self.pearson else (lambda x: x)
        per_level = [(norm(a(xs)) - norm(xt)).pow(2).mean() for a, xs, xt in zip(self.align, s.neck, t.neck)]
        return {"loss": self.weight * torch.stack(per_level).mean()}
