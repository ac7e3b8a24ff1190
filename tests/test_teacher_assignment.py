"""`ld_assign=teacher`: Label Assignment Distillation (Nguyen et al., WACV 2022). The student's task loss is assigned
from the teacher's predictions; everything else about the assignment (anchors, ground truth, assigner) is unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import student_step
from yolokd.config import DistillationConfigError, kd_defaults
from yolokd.taps import Features, _TeacherAssignment, assigner_of

NAMES = ["a", "b", "c"]


def run(assign: str, cfg: str = "yolov8n.yaml"):
    args = SimpleNamespace(**{**kd_defaults(), "method": "ld", "ld_assign": assign})
    return student_step(cfg, NAMES, args, teacher_cfg=cfg)


def assign_from(model, feats: Features, ctx):
    """The student's own (unhooked) assigner, run directly on the class logits and decoded boxes of `feats`."""
    points, strides = feats.anchors
    a = ctx.assign
    return assigner_of(model.init_criterion())(
        feats.scores.detach().sigmoid().permute(0, 2, 1), feats.boxes_xyxy.detach(), points * strides,
        a.gt_labels, a.gt_bboxes, a.mask_gt)


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo26n.yaml"])  # YOLO26: the one-to-many assignment
@pytest.mark.parametrize("assign", ["student", "teacher"])
def test_assignment_is_computed_from_the_chosen_model(assign, cfg):
    _, s, t, ctx, model, loss, _, _ = run(assign, cfg)
    assert torch.isfinite(loss).all()
    chosen, other = (s, t) if assign == "student" else (t, s)
    expected = assign_from(model, chosen, ctx)
    assert torch.equal(ctx.assign.fg_mask, expected[3].bool())
    assert torch.allclose(ctx.assign.target_scores, expected[2])
    not_chosen = assign_from(model, other, ctx)
    assert not torch.allclose(ctx.assign.target_scores, not_chosen[2])  # the two models really assign differently


def test_the_hook_only_acts_between_set_and_clear():
    hook = _TeacherAssignment()
    args = (torch.rand(1, 5, 3), torch.rand(1, 5, 4), "anchors", "labels")
    assert hook(None, args) is None  # cleared: Ultralytics' own arguments
    t = Features(neck=[torch.zeros(1, 8, 1, 5)], scores=torch.zeros(1, 3, 5), boxes=torch.ones(1, 4, 5),
                 strides=torch.tensor([8.0]), dfl=torch.nn.Identity())
    hook.set(t)
    scores, boxes, *rest = hook(None, args)
    assert torch.allclose(scores, torch.full((1, 5, 3), 0.5)) and rest == ["anchors", "labels"]
    # anchor k sits at (k + 0.5, 0.5) grid cells, stride 8; ltrb = 1 cell each way
    centres = torch.stack([torch.arange(5) + 0.5, torch.full((5,), 0.5)], 1) * 8
    assert torch.allclose(boxes[0], torch.cat([centres - 8, centres + 8], 1))
    with pytest.raises(RuntimeError, match="same anchors and classes"):
        hook(None, (torch.rand(1, 6, 3), *args[1:]))
    hook.clear()
    assert hook(None, args) is None


def test_the_loss_hooks_the_assigner_only_when_asked_and_clears_after_each_step():
    *_, crit = run("teacher")
    assert list(crit.teacher_assignment) == ["one2many"]
    assert crit.teacher_assignment["one2many"].scores is None  # cleared after the step
    crit.remove()
    assert not crit.task.assigner._forward_pre_hooks and not crit.task.assigner._forward_hooks
    *_, crit = run("student")
    assert not crit.teacher_assignment and not crit.task.assigner._forward_pre_hooks


def test_unknown_assign_is_refused():
    with pytest.raises(DistillationConfigError, match="ld_assign='gt' is not one of: student, teacher"):
        run("gt")
