"""Dense prediction distillation: soft class targets plus Localization Distillation (LD).

Not one of the five papers of this project: a response-based baseline that reads only the heads' outputs, to set
against the feature-based methods (and to compose with them, `method=dfd+ld`).

- Class term: knowledge distillation with soft targets (Hinton et al., 2015, arXiv:1503.02531), in the form a
  sigmoid head needs: per anchor and class, the binary KL(Bern(p_t) || Bern(p_s)), p = sigma(z). Its gradient
  w.r.t. z_s is p_s - p_t, exactly Ultralytics' BCE classification loss with the teacher's probabilities in place
  of the assigner's targets.
- Box term (reg_max > 1), after Localization Distillation (LD; Zheng et al., CVPR 2022, arXiv:2102.12252, Eq. 4-5)
  but not LD as published. What it computes, per anchor a:
      l_a = (1/4) sum_edges tau^2 * KL(softmax(d_t / tau) || softmax(d_s / tau)),  the KL summed over the reg_max bins
      L_box = sum_{b,a} w_a * l_a / N,  w_a = max_c p_t (teacher confidence, detached),  N = max(sum_{b,a} w_a, 1)
  tau = 10 and the weight 0.25 are the values of mmdetection's LD configs for GFL. Differences from LD: (1) the
  bins are summed, where mmdetection's KL loss averages over them, so at the same weight the term is reg_max (16)
  times larger per edge; (2) every anchor of P3-P5 counts, weighted by the teacher's confidence, where LD distils
  the positives (main region) and a "valuable localization region" picked with the ground truth, weighted by the
  prediction's quality; (3) no ground truth is read. When the student has reg_max = 1 (YOLO26, no distribution)
  or the two heads' reg_max differ, l_a is the mean L1 distance between the two models' decoded ltrb distances
  (grid units, each by its own DFL).

YOLO adaptation (ours):
- dense: background anchors, whose boxes mean nothing, barely count through w_a;
- both terms are divided by N = max(sum_{b,a} w_a, 1), the soft analogue of Ultralytics' `target_scores_sum`,
  so they have the scale of the task loss's own cls and dfl terms, whatever the image size or batch;
- L = cls_weight * L_cls + box_weight * L_box, logged as the terms "cls" and "box";
- `assign: teacher` adds Label Assignment Distillation (Nguyen et al., WACV 2022, arXiv:2108.10520): the student's
  own task loss is assigned from the teacher's class scores and boxes instead of its own (yolokd/taps.py,
  `_TeacherAssignment`); for YOLO26 each distilled branch is assigned from the teacher's matching branch (one-to-one
  too when `kd_one2one` and the teacher has one, yolokd/criterion.py). cfg/methods/ld.yaml
  ships `teacher`: on the 8-epoch warm-start CPU profile it raised the share of the gap closed from 38.5 % to
  43.2 % over 5 seeds (docs/experiments.md);
- being on the task loss's own scale, it is exempt from `kd_max_ratio` (the cap for feature terms whose paper
  weights were tuned on other features): capped at 0.25, its seed-0 gain on the CPU profile fell from +0.027 to
  +0.017 mAP50-95 (docs/experiments.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from yolokd.methods._common import prepare, soft_class_kd
from yolokd.methods.base import DistillMethod, StepContext, check_choice, register
from yolokd.taps import Features

ASSIGNERS = ("student", "teacher")  # `ld_assign`: whose predictions assign the student's task loss


def edge_kl(d_t: torch.Tensor, d_s: torch.Tensor, tau: float) -> torch.Tensor:
    """LD, Eq. 5: tau^2 * KL(softmax(d_t/tau) || softmax(d_s/tau)) per edge, for distributions (B, 4, R, A) -> (B, 4, A)."""
    log_t = F.log_softmax(d_t / tau, dim=2)
    log_s = F.log_softmax(d_s / tau, dim=2)
    return tau**2 * (log_t.exp() * (log_t - log_s)).sum(2)


@register
class DensePredictionKD(DistillMethod):
    name = "ld"
    summary = ("Dense prediction KD: soft class targets + Localization Distillation of the box distributions, "
               "with the task loss assigned from the teacher's predictions (LAD)")
    choices = {"assign": ASSIGNERS}
    task_scaled = True  # normalised like Ultralytics' cls/dfl losses: `kd_max_ratio` does not scale it

    def __init__(self, student: Features, teacher: Features, *, cls_weight: float, box_weight: float,
                 temperature: float, assign: str):
        super().__init__()
        check_choice("ld_assign", assign, ASSIGNERS)
        self.cls_weight, self.box_weight, self.tau = cls_weight, box_weight, temperature
        self.teacher_assigns = assign == "teacher"

    def forward(self, s: Features, t: Features, ctx: StepContext) -> dict[str, torch.Tensor]:
        s, t = prepare(s, t)
        b, _, a = s.scores.shape
        cls, w, norm = soft_class_kd(t.scores, s.scores)  # w: (B, A) teacher confidence
        self.record("confidence", w)
        reg_max = s.boxes.shape[1] // 4
        if reg_max > 1 and t.boxes.shape[1] == s.boxes.shape[1]:
            per_edge = edge_kl(t.boxes.view(b, 4, reg_max, a), s.boxes.view(b, 4, reg_max, a), self.tau)
        else:  # no distribution on the student (reg_max = 1, YOLO26) or different bins: the decoded ltrb distances
            per_edge = (t.dfl(t.boxes) - s.dfl(s.boxes)).abs()
        box = (per_edge.mean(1) * w).sum() / norm
        return {"cls": self.cls_weight * cls, "box": self.box_weight * box}
