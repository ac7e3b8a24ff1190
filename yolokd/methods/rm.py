"""Rank Mimicking, RM (Li et al., AAAI 2022, "Rank Mimicking and Prediction-guided Feature Imitation").

Paper (Sec. "Rank Mimicking"): for ground truth j with positive anchors a_1..a_N and their scores of j's class,
s_i (student) and t_i (teacher):
- rank distributions s' = softmax_i(s_i), t' = softmax_i(t_i)                                   (Eq. 5)
- L_RM = (1/M) sum_j KL(t' || s'), M the number of instances                                   (Eq. 6)
- a second rank by box quality IoU(box_i, GT_j); classification + localisation ranks work best (Tab. 4)
- total loss L_task + alpha * L_RM with alpha = 4 (Eq. 10). No temperature.
No code was released by the authors.

YOLO adaptation (docs/methods.md#rm):
- candidates: for each GT, the anchors the student's task-aligned assignment makes positive for it, together with
  those the same assigner makes positive on the teacher's predictions (`StepContext.teacher_assign`), keyed by
  (image, GT). The paper's motivating case (its Fig. 2) is an anchor the teacher ranks first and the student does
  not; with the student's positives alone that anchor is often not a candidate at all. Under `ld_assign=teacher`
  (LAD) the task assignment already is the teacher's. Both models are read at the same anchors (same strides, same
  input), so both rank the same candidates;
- cls rank (Eq. 5): softmax over the candidates of z / T, z the class logits of the GT's class (`scores: logit`,
  the default). Softmax is shift-invariant, so logits are what "the classification scores" of a sigmoid head
  reduce to (MMRazor's unofficial rank_mimic.py also ranks logits); T = `temperature` (1 = the paper, which has
  none). `scores: prob` ranks sigmoid(z) / T: with T = 1 its values lie in [0, 1], so both distributions are close
  to uniform and the KL cannot exceed about 0.11 whatever the ranking; it needs a small T to carry a signal.
  Student and teacher keep the anchor correspondence (no independent sorting, unlike a later MMRazor version);
- loc rank: u_i = IoU(student box_i, GT_j) with gradient through the box decode (DFL, or raw distances for
  reg_max = 1), v_i = IoU(teacher box_i, GT_j); KL(softmax(v / tau) || softmax(u / tau)), tau = `loc_temperature`
  (1 = the paper). IoUs are clamped to [0, 1] (an inverted reg_max = 1 box, possible early in training, gives 0);
- both KLs average over the GTs of the batch that have >= 2 candidates (a single candidate has KL = 0 and would
  only dilute M); a batch without such GTs gives 0 (kept in the graph);
- L = alpha * (KL_cls + loc_weight * KL_loc), logged as the terms "cls" and "loc"; loc_weight = 0 is the paper's
  cls-only row of Tab. 4;
- groups are handled with scatter/index_add (a log-softmax per group), never a Python loop over GTs;
- its YAML's `fade` (`rm_fade`, 0.5) lowers L linearly to 0 over the last half of training (the criterion applies
  it, `method_fade`); the paper's constant alpha is `rm_fade=0`.
"""

from __future__ import annotations

import torch

from ultralytics.utils.metrics import bbox_iou

from yolokd.methods._common import prepare
from yolokd.methods.base import DistillMethod, StepContext, check_choice, register
from yolokd.taps import Assignment, Features


SCORES = ("logit", "prob")  # `rm_scores`: what the class-rank softmax reads


def group_log_softmax(x: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """log-softmax of the values x (P,) within their groups `group` (P,) in 0..n_groups-1 (each group non-empty)."""
    shift = x.new_full((n_groups,), float("-inf")).scatter_reduce(0, group, x.detach(), "amax")
    lse = shift + torch.zeros_like(shift).index_add(0, group, (x - shift[group]).exp()).log()
    return x - lse[group]


def rank_kl(log_t: torch.Tensor, log_s: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Eq. 6 per group: KL(t' || s') (n_groups,) from the log rank distributions (P,) of `group_log_softmax`."""
    return torch.zeros(n_groups, device=log_t.device).index_add(0, group, log_t.exp() * (log_t - log_s))


def group_kl(target: torch.Tensor, student: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """KL(softmax(target) || softmax(student)) within each group: (n_groups,). Softmax over each group's members."""
    return rank_kl(group_log_softmax(target, group, n_groups), group_log_softmax(student, group, n_groups),
                   group, n_groups)


def candidates(student: Assignment, teacher: Assignment | None) -> tuple[torch.Tensor, ...]:
    """(image, anchor, GT index) of every candidate: the positives of the student's assignment and of the teacher's
    (same ground truth), an (anchor, GT) pair counted once. Each a (P,) long tensor."""
    parts = [a for a in (student, teacher) if a is not None]
    b, anc = torch.cat([a.fg_mask.nonzero() for a in parts]).T
    gt = torch.cat([a.target_gt_idx[a.fg_mask] for a in parts]).long()
    if len(parts) > 1:  # drop the pairs both assignments hold
        n_a, n_gt = student.fg_mask.shape[1], student.gt_bboxes.shape[1]
        key = torch.unique((b * n_gt + gt) * n_a + anc)
        b, gt, anc = key // (n_gt * n_a), key // n_a % n_gt, key % n_a
    return b, anc, gt


@register
class RankMimicking(DistillMethod):
    name = "rm"
    summary = ("Rank Mimicking: KL between teacher and student rankings (class score, IoU) of each GT's candidates, "
               "the positives of both models")
    choices = {"scores": SCORES}
    needs_teacher_positives = True

    def __init__(self, student: Features, teacher: Features, *, weight: float, loc_weight: float,
                 loc_temperature: float, scores: str, temperature: float):
        super().__init__()
        check_choice("rm_scores", scores, SCORES)
        self.weight, self.loc_weight, self.tau, self.scores = weight, loc_weight, loc_temperature, scores
        self.temperature = temperature

    def forward(self, s: Features, t: Features, ctx: StepContext) -> dict[str, torch.Tensor]:
        s, t = prepare(s, t)
        a = ctx.assign
        zero = {"cls": 0.0 * s.scores.sum(), "loc": 0.0 * s.boxes.sum()}  # keeps the graph whole (DDP)
        if a is None:
            return zero
        b, anc, gt = candidates(a, ctx.teacher_assign)  # (P,) each
        _, group, counts = torch.unique(b * a.gt_bboxes.shape[1] + gt, return_inverse=True, return_counts=True)
        n_valid = (counts >= 2).sum()
        if n_valid == 0:
            return zero
        n = counts.numel()
        cls = a.gt_labels[b, gt, 0].long()
        z_t, z_s = t.scores[b, cls, anc], s.scores[b, cls, anc]
        if self.scores == "prob":
            z_t, z_s = z_t.sigmoid(), z_s.sigmoid()
        rank_t, rank_s = (group_log_softmax(z / self.temperature, group, n) for z in (z_t, z_s))  # Eq. 5, log t', s'
        kl_cls = rank_kl(rank_t, rank_s, group, n)
        box_gt = a.gt_bboxes[b, gt].float()
        u = bbox_iou(s.boxes_xyxy[b, anc], box_gt, xywh=False).squeeze(-1).clamp(0, 1)
        v = bbox_iou(t.boxes_xyxy[b, anc], box_gt, xywh=False).squeeze(-1).clamp(0, 1).detach()
        kl_loc = group_kl(v / self.tau, u / self.tau, group, n)
        self.record("candidates", b, anc, gt, group)  # (P,) each: image, anchor, GT index, object
        self.record("rank", rank_t, rank_s)  # (P,) each: log t', log s' of the class scores (Eq. 5)
        self.record("kl", kl_cls, kl_loc)  # (objects,) each: Eq. 6 per object, class and box-quality ranks
        kl_cls, kl_loc = kl_cls.sum() / n_valid, kl_loc.sum() / n_valid
        return {"cls": self.weight * kl_cls, "loc": self.weight * self.loc_weight * kl_loc}
