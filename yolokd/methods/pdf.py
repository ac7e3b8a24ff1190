"""PDF-Distil: prediction disagreement-weighted feature distillation (Zhang et al., BMVC 2021), at the neck.

Paper (Sec. 3.2), per feature map with H x W positions and C channels, P^t / P^s the class probabilities:
- disagreement D_hw = sum_M sum_N F(P^t_hw, P^s_hw), F in {KL, L1, L2} (L2 best, Tab. 1); M = 1 anchor-free (Eq. 1)
- weight W_hw = H*W * D_hw / sum_hw D                                                                 (Eq. 2)
- L_kd = sum_hw (W_hw * sum_c (X^t - X^s)^2) / (H*W*C), X^s the projected student feature             (Eq. 3)
The authors' code (zhanghengdev/MutualGuide, hint_loss.py) weights the loss by 5.0.

YOLO adaptation (docs/methods.md#pdf):
- one map per image and neck level P3..P5 (the Detect inputs); D from the sigmoid class probabilities of the
  same anchors, L = mean_{b,l}[mean_hw W * mean_c (X^t - Adapt(X^s))^2], weight 5.0. Adapt (`projector`) is the
  paper's 1x1 conv ("conv", identity when the widths match) or the authors' code's branch ("branch": 3x3 conv + BN +
  activation, then a 1x1 conv; yolokd/adapters.py). cfg/methods/pdf.yaml ships "branch": on the 8-epoch
  warm-start CPU profile it doubled the gain of the 1x1 conv, +0.016 against +0.007 mAP50-95 over 10 seeds
  (docs/experiments.md);
- per-map normalisation (the paper's Eq. 2) keeps L invariant to image size and level; the authors' code
  normalises over the whole batch and all levels instead;
- `disagreement`: "l2" = ||sigma(z^t) - sigma(z^s)||_2 over classes (the paper's best, and the paper-era code),
  "l1" = the L1 distance, "kl" = binary KL(teacher || student) per class summed over classes (a sigmoid head has
  nc independent Bernoulli outputs, not one softmax distribution);
- D and W are computed without gradient (the student's logits only weight the loss, they are not trained by it);
  a map whose disagreements sum to < 1e-8 (student and teacher agree everywhere) gets W = 1, i.e. FitNet.
"""

from __future__ import annotations

import torch

from yolokd.adapters import PROJECTORS, level_aligners
from yolokd.methods._common import binary_kl, feature_gaps, level_mean, prepare, split_levels
from yolokd.methods.base import DistillMethod, StepContext, check_choice, register
from yolokd.taps import Features

EPS = 1e-8
DISAGREEMENTS = ("l2", "l1", "kl")


@torch.no_grad()
def disagreement(z_s: torch.Tensor, z_t: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Eq. 1: per-position disagreement (B, N) between class logits (B, nc, N) of the student and the teacher."""
    z_s, z_t = z_s.float(), z_t.float()
    if kind == "kl":  # sum_c KL(Bern(p_t) || Bern(p_s))
        return binary_kl(z_t, z_s).sum(1)
    diff = z_t.sigmoid() - z_s.sigmoid()
    return diff.abs().sum(1) if kind == "l1" else diff.pow(2).sum(1).sqrt()


@torch.no_grad()
def pdf_weights(d: torch.Tensor) -> torch.Tensor:
    """Eq. 2 per map: (B, N) disagreements -> N * D / sum D, of mean 1 over N (all ones if sum D < eps)."""
    total = d.sum(1, keepdim=True)
    w = d.shape[1] * d / total.clamp_min(EPS)
    return torch.where(total < EPS, torch.ones_like(w), w)


@register
class PDFDistil(DistillMethod):
    name = "pdf"
    summary = "PDF-Distil: neck imitation weighted per position by the teacher-student class disagreement"
    aligned = {"align": "neck"}
    choices = {"disagreement": DISAGREEMENTS, "projector": PROJECTORS}
    head_level = False  # the class scores only weight the neck term (no gradient): read from the one-to-many branch

    def __init__(self, student: Features, teacher: Features, *, weight: float, disagreement: str, projector: str):
        super().__init__()
        check_choice("pdf_disagreement", disagreement, DISAGREEMENTS)
        check_choice("pdf_projector", projector, PROJECTORS)
        self.weight, self.kind = weight, disagreement
        self.align = level_aligners(student.neck, teacher.neck, projector)

    def forward(self, s: Features, t: Features, ctx: StepContext) -> dict[str, torch.Tensor]:
        s, t = prepare(s, t)
        w = [pdf_weights(disagreement(zs, zt, self.kind))
             for zs, zt in zip(split_levels(s.scores, s.neck), split_levels(t.scores, t.neck))]
        self.record("weight", *w)  # Eq. 2, one (B, H_l*W_l) map per level
        gaps = feature_gaps(self.align, s.neck, t.neck)
        return {"loss": self.weight * level_mean([wl * g for wl, g in zip(w, gaps)])}
