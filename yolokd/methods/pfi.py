"""Prediction-guided Feature Imitation, PFI (Li et al., AAAI 2022, "Rank Mimicking and Prediction-guided Feature
Imitation"), at the neck.

Paper (Sec. "Prediction-guided Feature Imitation"), per FPN level l with class probability maps P (H x W x C):
- P_dif = (1/C) sum_c |P_stu^c - P_tea^c|^2                                              (Eq. 7)
- F_dif = (1/Q) sum_q |F_stu^q - F_tea^q|^2 over the Q feature channels                    (Eq. 8)
- L_PFI = (1/L) sum_l (1/(H_l W_l)) ||P_dif (.) F_dif||_2^2, weight beta = 1.5               (Eq. 9, 10)
No code was released by the authors.

YOLO adaptation (docs/methods.md#pfi), the default (`faithful: false`):
- F = the Detect inputs P3..P5; F_stu passes through a 1x1 adapter (identity when widths match);
- P = sigmoid of the class logits at the same anchors. Eq. 9 is a loss in both factors, so P_dif keeps its
  gradient (`detach: false`, as in MMRazor's unofficial pgfi.py): where the features differ, the student's class
  probabilities are pulled towards the teacher's, dL/dP_s ~ 2 (P_s - P_t) F_dif / (C c). `detach: true` makes P_dif
  a weight only (the first reading, see docs/methods.md#pfi);
- w = P_dif / c with one detached normaliser for the batch, c = max(mean P_dif, E_t), means over the batch and every
  anchor of every level, E_t = mean (1/C) sum_c P_tea^c^2: the P_dif of a student that predicts nothing. Raw
  probability-space P_dif is ~1e-4, which would leave beta = 1.5 inert; one global c keeps the contrast between
  levels and images (unlike PDF-Distil's per-map normalisation). E_t does not depend on the student, so c cannot
  shrink with the gap: w is Eq. 9's weight up to a factor set by the teacher, it fades as the student catches up
  (mean w <= 1), and the gradient on a student logit is at most beta F_dif / (2 C E_t) per anchor and falls with
  the gap. Normalising by mean P_dif alone (the form before) made it grow as the student approached the teacher:
  a gap 100x smaller gave a 100x larger gradient. mean P_dif exceeds E_t only while the student's false positives
  outweigh what the teacher predicts;
- L = mean_l mean_{b,hw}(w * F_dif): no second square (MMRazor's unofficial pgfi.py does the same).
`faithful: true` keeps Eq. 9 as written: w = P_dif (no normalisation) and the squared product (P_dif * F_dif)^2.
"""

from __future__ import annotations

import torch

from yolokd.adapters import level_aligners
from yolokd.methods._common import feature_gaps, level_mean, prepare, split_levels
from yolokd.methods.base import DistillMethod, StepContext, register
from yolokd.taps import Features

EPS = 1e-12


def prediction_gap(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """Eq. 7: (B, nc, A) logits -> (B, A) mean over classes of the squared probability difference."""
    return (z_s.float().sigmoid() - z_t.float().sigmoid()).pow(2).mean(1)


@torch.no_grad()
def gap_normaliser(p_dif: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """The detached scale c = max(mean P_dif, E_t) of the weights w = P_dif / c (see the module docstring), with
    E_t = mean over images and anchors of (1/C) sum_c sigma(z_t)^2, the P_dif of a student that predicts nothing."""
    energy = z_t.float().sigmoid().pow(2).mean()
    return torch.maximum(p_dif.mean(), energy).clamp_min(EPS)


@register
class PFI(DistillMethod):
    name = "pfi"
    summary = "PFI: neck imitation weighted by the teacher-student class-probability gap, which it also shrinks"
    aligned = {"align": "neck"}

    def __init__(self, student: Features, teacher: Features, *, weight: float, faithful: bool, detach: bool):
        super().__init__()
        self.weight, self.faithful, self.detach = weight, bool(faithful), bool(detach)
        self.align = level_aligners(student.neck, teacher.neck)

    def forward(self, s: Features, t: Features, ctx: StepContext) -> dict[str, torch.Tensor]:
        s, t = prepare(s, t)
        p_dif = prediction_gap(s.scores.detach() if self.detach else s.scores, t.scores)
        w = p_dif if self.faithful else p_dif / gap_normaliser(p_dif, t.scores)
        self.record("weight", w)  # (B, A), every level: the weight of F_dif in Eq. 9
        gaps = feature_gaps(self.align, s.neck, t.neck)
        power = 2 if self.faithful else 1
        return {"loss": self.weight * level_mean([(wl * g).pow(power) for wl, g in zip(split_levels(w, s.neck), gaps)])}
