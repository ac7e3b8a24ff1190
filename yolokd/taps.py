"""Taps: the one place that reads Ultralytics YOLO internals during a training step.

What a method can see of a model (student or teacher) after one forward pass, as a `Features`:
- `neck`: the inputs of the `Detect` head, P3..P5 (B, C_l, H_l, W_l). Taken from the head's raw output dict
  (`feats`), so no hook is needed;
- `scores` (B, nc, A) class logits and `boxes` (B, 4*reg_max, A) raw box distributions, A = sum_l H_l*W_l;
- `cls_feat` / `box_feat`: outputs of the first block of the class and box branches (`cv3[l][0]`, `cv2[l][0]`),
  captured by forward hooks, only when a method asks for them.
End-to-end heads (YOLO26) give `{"one2many": ..., "one2one": ...}`; the taps always read `one2many`, whose
inputs are not detached and which the assigner-based loss trains.

The student's task-aligned assignment (`Assignment`) is captured by a forward hook on the criterion's assigner,
so it is never computed twice.
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


def head_of(model: nn.Module) -> nn.Module:
    """The `Detect` head (last layer) of an Ultralytics DetectionModel."""
    return model.model[-1]


def one2many(preds) -> dict:
    """The one-to-many raw prediction dict, whatever the head type and train/eval mode."""
    preds = preds[1] if isinstance(preds, tuple) else preds
    return preds["one2many"] if "one2many" in preds else preds


class _Recorder:
    """A forward hook that stores a module's output under `store[key][index]`.

    It is a plain callable object, so `strip_taps` can recognise and remove it from a copied model.
    """

    def __init__(self, store: dict, key: str, index: int):
        self.store, self.key, self.index = store, key, index

    def __call__(self, module, args, output):
        self.store.setdefault(self.key, {})[self.index] = output


class _AssignmentRecorder:
    """Forward hook on a `TaskAlignedAssigner`: keeps its inputs' ground truth and its outputs."""

    def __init__(self):
        self.last: Assignment | None = None

    def __call__(self, module, args, output):
        _, target_bboxes, target_scores, fg_mask, target_gt_idx = output
        gt_labels, gt_bboxes, mask_gt = args[3], args[4], args[5]
        self.last = Assignment(fg_mask.bool(), target_gt_idx, target_bboxes, target_scores, gt_labels, gt_bboxes, mask_gt)


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
        self.scores = teacher.scores.detach().sigmoid().permute(0, 2, 1)
        self.boxes = teacher.boxes_xyxy.detach()

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
        self._store: dict[str, dict[int, torch.Tensor]] = {}
        self._handles = []
        for tap in sorted(wanted & set(BRANCH_TAPS)):
            for i, branch in enumerate(getattr(self.head, BRANCH_TAPS[tap])):
                self._handles.append(branch[0].register_forward_hook(_Recorder(self._store, tap, i)))

    def collect(self, preds) -> Features:
        """Features of the forward pass that produced `preds` (train- or eval-mode output of the model)."""
        p = one2many(preds)
        branch = {k: [v[i] for i in sorted(v)] for k, v in self._store.items()}
        self._store.clear()
        return Features(
            neck=list(p["feats"]),
            scores=p["scores"],
            boxes=p["boxes"],
            strides=self.head.stride,
            dfl=self.head.dfl,
            cls_feat=branch.get("cls_feat", []),
            box_feat=branch.get("box_feat", []),
        )

    def remove(self):
        """Detach every hook this object registered."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def assigner_of(criterion) -> nn.Module:
    """The assigner whose targets train the one-to-many branch (`E2ELoss.one2many` for YOLO26)."""
    return getattr(criterion, "one2many", criterion).assigner


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
