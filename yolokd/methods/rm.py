"""Rank Mimicking, RM (Li et al., AAAI 2022, "Rank Mimicking and Prediction-guided Feature Imitation").

Paper (Sec. "Rank Mimicking"): for ground truth j with positive anchors a_1..a_N and their scores of j's class,
s_i (student) and t_i (teacher):
- rank distributions s' = softmax_i(s_i), t' = softmax_i(t_i)                                   (Eq. 5)
- L_RM = (1/M) sum_j KL(t' || s'), M the number of instances                                   (Eq. 6)
- a second rank by box quality IoU(box_i, GT_j); classification + localisation ranks work best (Tab. 4)
- total loss L_task + alpha * L_RM with alpha = 4 (Eq. 10). No temperature.
No code was released by the authors.

YOLO adaptation (METHODS.md section 2):
- groups = the student's task-aligned positives (fg_mask), keyed by (image, target_gt_idx); the teacher is read at
  the same anchors (same strides, same input), so both rank the same candidates;
- cls rank: s_i = sigma(z^s[a_i, c_j]), t_i = sigma(z^t[a_i, c_j]), the classification scores (`scores: prob`,
  the default). The paper's Eq. 5 takes the softmax of the "classification scores" with no temperature; read as
  probabilities, both of its ranks (scores and IoUs) live in [0, 1] and have comparable KLs, which its Tab. 4 sums
  with equal weight, and alpha = 4 gives a small auxiliary term. `scores: logit` (METHODS.md's reading, raw z) makes
  the class KL ~40x larger: 0.2x the task loss in epoch 1 and -0.019 mAP50-95 at 8 epochs on the CPU profile
  (docs/benchmarks.md). Student and teacher keep the anchor correspondence (no independent sorting, unlike a later
  MMRazor version);
- loc rank: u_i = IoU(student box_i, GT_j) with gradient through the box decode (DFL, or raw distances for
  reg_max = 1), v_i = IoU(teacher box_i, GT_j); KL(softmax(v / tau) || softmax(u / tau)), tau = `loc_temperature`
  (1 = the paper). IoUs are clamped to [0, 1] (an inverted reg_max = 1 box, possible early in training, gives 0);
- both KLs average over the GTs of the batch that have >= 2 positives (a single positive has KL = 0 and would
  only dilute M); a batch without such GTs gives 0 (kept in the graph);
- L = alpha * (KL_cls + loc_weight * KL_loc), logged as the terms "cls" and "loc"; loc_weight = 0 is the paper's
  cls-only row of Tab. 4;
- groups are handled with scatter/index_add (a log-softmax per group), never a Python loop over GTs.
"""

from __future__ import annotations

import torch

from ultralytics.utils.metrics import bbox_iou

from yolokd.methods._common import prepare
from yolokd.methods.base import DistillMethod, StepContext, check_choice, register
from yolokd.taps import Features


SCORES = ("logit", "prob")  # `rm_scores`: what the class-rank softmax reads


def group_log_softmax(x: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """log-softmax of the values x (P,) within their groups `group` (P,) in 0..n_groups-1 (each group non-empty)."""
    shift = x.new_full((n_groups,), float("-inf")).scatter_reduce(0, group, x.detach(), "amax")
    lse = shift + torch.zeros_like(shift).index_add(0, group, (x - shift[group]).exp()).log()
    return x - lse[group]


def group_kl(target: torch.Tensor, student: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """KL(softmax(target) || softmax(student)) within each group: (n_groups,). Softmax over each group's members."""
    log_t = group_log_softmax(target, group, n_groups)
    log_s = group_log_softmax(student, group, n_groups)
    return torch.zeros(n_groups, device=target.device).index_add(0, group, log_t.exp() * (log_t - log_s))


@register
class RankMimicking(DistillMethod):
    name = "rm"
    summary = "Rank Mimicking: KL between teacher and student rankings (class score, IoU) of each GT's positives"

    choices = {"scores": SCORES}

    def __init__(self, student: Features, teacher: Features, *, weight: float, loc_weight: float,
                 loc_temperature: float, scores: str):
        super().__init__()
        check_choice("rm_scores", scores, SCORES)
        self.weight, self.loc_weight, self.tau, self.scores = weight, loc_weight, loc_temperature, scores

    def forward(self, s: Features, t: Features, ctx: StepContext) -> dict[str, torch.Tensor]:
        s, t = prepare(s, t)
        a = ctx.assign
        zero = {"cls": 0.0 * s.scores.sum(), "loc": 0.0 * s.boxes.sum()}  # keeps the graph whole (DDP)
        if a is None:
            return zero
        b, anc = a.fg_mask.nonzero(as_tuple=True)  # positive anchors, (P,) each
        gt = a.target_gt_idx[b, anc].long()
        _, group, counts = torch.unique(b * a.gt_bboxes.shape[1] + gt, return_inverse=True, return_counts=True)
        n_valid = (counts >= 2).sum()
        if n_valid == 0:
            return zero
        n = counts.numel()
        cls = a.gt_labels[b, gt, 0].long()
        z_t, z_s = t.scores[b, cls, anc], s.scores[b, cls, anc]
        if self.scores == "prob":
            z_t, z_s = z_t.sigmoid(), z_s.sigmoid()
        kl_cls = group_kl(z_t, z_s, group, n).sum() / n_valid
        box_gt = a.gt_bboxes[b, gt].float()
        u = bbox_iou(s.boxes_xyxy[b, anc], box_gt, xywh=False).squeeze(-1).clamp(0, 1)
        v = bbox_iou(t.boxes_xyxy[b, anc], box_gt, xywh=False).squeeze(-1).clamp(0, 1).detach()
        kl_loc = group_kl(v / self.tau, u / self.tau, group, n).sum() / n_valid
        return {"cls": self.weight * kl_cls, "loc": self.weight * self.loc_weight * kl_loc}
