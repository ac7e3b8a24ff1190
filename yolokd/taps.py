"""Taps: the one place that reads Ultralytics YOLO internals during a training step.

What a method can see of a model (student or teacher) after one forward pass, as a `Features`:
- `neck`: the inputs of the `Detect` head, P3..P5 (B, C_l, H_l, W_l). Taken from the head's raw output dict
  (`feats`), so no hook is needed;
- `scores` (B, nc, A) class logits and `boxes` (B, 4*reg_max, A) raw box distributions, A = sum_l H_l*W_l;
- `cls_feat` / `box_feat`: outputs of the first block of the class and box branches (`cv3[l][0]`, `cv2[l][0]`),
  captured by forward hooks, only when a method asks for them.
End-to-end heads (YOLO26) give `{"one2many": ..., "one2one": ...}`. The `Features` of a forward are the one-to-many
branch's (whose inputs are not detached and which the dense assigner trains), and `Features.one2one` holds the
one-to-one branch, the head that is deployed: its scores, boxes and branch features, with the one-to-many branch's
(attached) neck, since Ultralytics feeds the one-to-one head a detached copy of the same maps. The criterion
distils both branches (`DistillationLoss`).

The student's task-aligned assignment (`Assignment`) is captured by a forward hook on the criterion's assigner,
so it is never computed twice; `assign_like` re-runs the same assigner on other predictions (the teacher's).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from ultralytics.utils.tal import dist2bbox, make_anchors

BRANCH_TAPS = {"cls_feat": "cv3", "box_feat": "cv2"}  # tap name -> Detect branch whose first block it reads


@dataclass
class Features:
    """What one model produced in one forward pass (see module docstring)."""

    neck: list[torch.Tensor]
    scores: torch.Tensor
    boxes: torch.Tensor
    strides: torch.Tensor  # (nl,) e.g. [8, 16, 32]
    dfl: nn.Module  # the head's own distribution-to-distance decoder (identity for reg_max=1)
    cls_feat: list[torch.Tensor] = field(default_factory=list)
    box_feat: list[torch.Tensor] = field(default_factory=list)
    one2one: Features | None = None  # end-to-end heads: the one-to-one (deployed) branch, same neck

    @functools.cached_property
    def anchors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor centres (A, 2) in grid units and their strides (A, 1), as Ultralytics' loss computes them."""
        return make_anchors(self.neck, self.strides, 0.5)

    @functools.cached_property
    def boxes_xyxy(self) -> torch.Tensor:
        """Decoded boxes (B, A, 4), xyxy in input pixels, differentiable w.r.t. `boxes` (Ultralytics' DFL decode)."""
        anchor_points, stride_tensor = self.anchors
        dist = self.dfl(self.boxes)  # (B, 4, A) ltrb distances in grid units
        return dist2bbox(dist, anchor_points.T.unsqueeze(0), xywh=False, dim=1).transpose(1, 2) * stride_tensor

    def float(self) -> Features:
        """A copy with every tensor in fp32 (KD math runs in fp32 even under AMP)."""
        return Features(
            neck=[x.float() for x in self.neck],
            scores=self.scores.float(),
            boxes=self.boxes.float(),
            strides=self.strides,
            dfl=self.dfl,
            cls_feat=[x.float() for x in self.cls_feat],
            box_feat=[x.float() for x in self.box_feat],
            one2one=None if self.one2one is None else self.one2one.float(),
        )


@dataclass
class Assignment:
    """The student's task-aligned assignment for one batch (Ultralytics `TaskAlignedAssigner` outputs).

    Boxes are xyxy in input pixels; `n` is the padded number of ground-truth boxes per image.
    """

    fg_mask: torch.Tensor  # (B, A) bool, positive anchors
    target_gt_idx: torch.Tensor  # (B, A) long, index of the assigned ground truth in 0..n-1
    target_bboxes: torch.Tensor  # (B, A, 4)
    target_scores: torch.Tensor  # (B, A, nc) IoU-aware soft targets
    gt_labels: torch.Tensor  # (B, n, 1)
    gt_bboxes: torch.Tensor  # (B, n, 4)
    mask_gt: torch.Tensor  # (B, n, 1) 1 for real boxes, 0 for padding
    anchor_points: torch.Tensor | None = None  # (A, 2) anchor centres in pixels, as the assigner received them


def head_of(model: nn.Module) -> nn.Module:
    """The `Detect` head (last layer) of an Ultralytics DetectionModel."""
    return model.model[-1]


BRANCHES = ("one2many", "one2one")  # the prediction dicts of an end-to-end head; a plain head has the first only


def branch_preds(preds, branch: str = "one2many") -> dict | None:
    """The raw prediction dict of `branch`, whatever the head type and train/eval mode (None: no such branch)."""
    preds = preds[1] if isinstance(preds, tuple) else preds
    if "one2many" not in preds:
        return preds if branch == "one2many" else None
    return preds.get(branch)


class _Recorder:
    """A forward hook that stores a module's output under `store[key][index]`.

    It is a plain callable object, so `strip_taps` can recognise and remove it from a copied model.
    """

    def __init__(self, store: dict, key: str, index: int):
        self.store, self.key, self.index = store, key, index

    def __call__(self, module, args, output):
        self.store.setdefault(self.key, {})[self.index] = output


def _assignment(args, output) -> Assignment:
    """An `Assignment` from a `TaskAlignedAssigner` call's arguments and outputs."""
    _, target_bboxes, target_scores, fg_mask, target_gt_idx = output
    anchor_points, gt_labels, gt_bboxes, mask_gt = args[2:6]
    return Assignment(fg_mask.bool(), target_gt_idx, target_bboxes, target_scores, gt_labels, gt_bboxes, mask_gt,
                      anchor_points)


class _AssignmentRecorder:
    """Forward hook on a `TaskAlignedAssigner`: keeps its inputs' ground truth and its outputs."""

    def __init__(self):
        self.last: Assignment | None = None

    def __call__(self, module, args, output):
        self.last = _assignment(args, output)


def predictions_for_assigner(f: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """What Ultralytics' loss hands the assigner, from `f`: class probabilities (B, A, nc) and decoded boxes
    (B, A, 4) xyxy in pixels, detached."""
    return f.scores.detach().sigmoid().permute(0, 2, 1), f.boxes_xyxy.detach()


@torch.no_grad()
def assign_like(assigner: nn.Module, f: Features, like: Assignment) -> Assignment:
    """The assignment `assigner` makes from the predictions of `f` (e.g. the teacher's), for the anchors and ground
    truth of `like` (a recorded assignment). It calls `forward` directly, so no yolokd hook sees or changes it."""
    scores, boxes = predictions_for_assigner(f)
    args = (scores, boxes.to(like.gt_bboxes.dtype), like.anchor_points, like.gt_labels, like.gt_bboxes, like.mask_gt)
    return _assignment(args, assigner.forward(*args))


class _TeacherAssignment:
    """Forward pre-hook on the student's `TaskAlignedAssigner`: it assigns from the teacher's predictions.

    Label Assignment Distillation (Nguyen et al., WACV 2022, arXiv:2108.10520): the student is trained on
    the assignment its teacher's predictions produce, not its own. Ultralytics' assigner scores each anchor by
    s^alpha * IoU^beta of the predicted class score s and box; this swaps the student's (detached) scores and
    decoded boxes for the teacher's, which leaves which anchors are positive and their soft targets to the teacher.
    `set` before the task loss runs, `clear` after; between the two, every other argument passes unchanged.
    """

    def __init__(self):
        self.scores: torch.Tensor | None = None  # (B, A, nc) teacher class probabilities
        self.boxes: torch.Tensor | None = None  # (B, A, 4) teacher boxes, xyxy input pixels

    def set(self, teacher: Features) -> None:
        """Take the teacher's fp32 features of this step (`DistillationLoss` converts them once)."""
        self.scores, self.boxes = predictions_for_assigner(teacher)

    def clear(self) -> None:
        self.scores = self.boxes = None

    def __call__(self, module, args):
        if self.scores is None:
            return None
        if self.scores.shape != args[0].shape:
            raise RuntimeError(f"teacher scores {tuple(self.scores.shape)} do not match the student's "
                               f"{tuple(args[0].shape)}: the assignment needs the same anchors and classes")
        return (self.scores.to(args[0].dtype), self.boxes.to(args[1].dtype), *args[2:])


class Taps:
    """Hooks on one model's head. `collect(preds)` turns a forward's raw output into `Features`."""

    def __init__(self, model: nn.Module, wanted: set[str] = frozenset()):
        self.head = head_of(model)
        self._store: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        self._handles = []
        for tap in sorted(wanted & set(BRANCH_TAPS)):
            for branch, prefix in (("one2many", ""), ("one2one", "one2one_")):
                for i, block in enumerate(getattr(self.head, prefix + BRANCH_TAPS[tap], None) or []):
                    self._handles.append(block[0].register_forward_hook(_Recorder(self._store, (branch, tap), i)))

    def collect(self, preds) -> Features:
        """Features of the forward pass that produced `preds` (train- or eval-mode output of the model)."""
        taps = {k: [v[i] for i in sorted(v)] for k, v in self._store.items()}
        self._store.clear()
        p = branch_preds(preds, "one2many")
        neck = list(p["feats"])

        def features(branch: str, p: dict) -> Features:
            return Features(neck=neck, scores=p["scores"], boxes=p["boxes"], strides=self.head.stride,
                            dfl=self.head.dfl, cls_feat=taps.get((branch, "cls_feat"), []),
                            box_feat=taps.get((branch, "box_feat"), []))

        out = features("one2many", p)
        o2o = branch_preds(preds, "one2one")
        if o2o is not None:
            out.one2one = features("one2one", o2o)
        return out

    def remove(self):
        """Detach every hook this object registered."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def assigner_of(criterion, branch: str = "one2many") -> nn.Module | None:
    """The assigner whose targets train `branch` (`E2ELoss.one2many` / `.one2one` for YOLO26; a plain criterion
    has the one-to-many branch only, None for the other)."""
    if hasattr(criterion, "one2many"):
        return getattr(criterion, branch).assigner
    return criterion.assigner if branch == "one2many" else None


def strip_taps(model: nn.Module) -> int:
    """Remove yolokd hooks from every submodule of `model` (e.g. a deep copy of a tapped student).

    Returns:
        (int): the number of hooks removed.
    """
    removed = 0
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            ours = (_Recorder, _AssignmentRecorder, _TeacherAssignment)
            for k in [k for k, h in hooks.items() if isinstance(h, ours)]:
                del hooks[k]
                removed += 1
    return removed


def raw_forward(model: nn.Module, img: torch.Tensor):
    """Run `model` in eval mode (BatchNorm running statistics, no dropout) but get the head's raw training output.

    Setting only the head's own `training` flag skips the inference decode and NMS-free post-processing, which the
    teacher does not need, while every layer keeps its eval behaviour.
    """
    head = head_of(model)
    was_training = head.training
    head.training = True
    try:
        return model(img)
    finally:
        head.training = was_training
