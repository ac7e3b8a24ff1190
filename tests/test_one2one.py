"""YOLO26 (end-to-end head): the one-to-one branch, the head that is deployed, is distilled too (`kd_one2one`).

`E2ELoss` trains both branches with weights o2m + o2o = 1; the criterion computes each head-level method on both
branches (student one-to-one against teacher one-to-one, with the one-to-one assignment) and weights the two the
same way. Neck-level methods read the shared neck once.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel

from yolokd.config import kd_defaults
from yolokd.criterion import build_distillation
from yolokd.methods.base import StepContext
from yolokd.taps import assign_like, assigner_of, raw_forward

NC = 3


def setup(method: str, teacher_cfg: str | None, one2one: bool = True, **kw):
    """A random YOLO26n student, a random teacher, and their DistillationLoss. The one-to-one heads start as copies
    of the one-to-many heads; they are perturbed so that the two branches predict differently, as after training."""
    torch.manual_seed(0)
    args = SimpleNamespace(**{**kd_defaults(), "method": method, **kw})
    student = DetectionModel("yolo26n.yaml", nc=NC, verbose=False)
    student.args = get_cfg()
    teacher = DetectionModel(teacher_cfg, nc=NC, verbose=False).eval() if teacher_cfg else None
    with torch.no_grad():
        for model in (student, teacher):
            for name, p in model.named_parameters() if model is not None else ():
                if "one2one" in name:
                    p.add_(0.2 * torch.randn_like(p))
    args.kd_one2one = one2one
    return student, teacher, build_distillation(method.split("+"), student, teacher, args).install(student)


def batch(b: int = 2):
    g = torch.Generator().manual_seed(1)
    return {"img": torch.rand(b, 3, 64, 64, generator=g), "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
            "cls": torch.tensor([[0.0], [2.0], [1.0]]),
            "bboxes": torch.tensor([[0.3, 0.3, 0.4, 0.3], [0.7, 0.6, 0.3, 0.5], [0.5, 0.5, 0.6, 0.6]])}


def kd_grad_on_one2one_head(student, crit) -> float:
    """|d kd / d params| summed over the one-to-one head's convolutions (its inputs are detached, so only a term on
    that branch's outputs can reach them)."""
    student.train()
    loss, _ = crit(student(batch()["img"]), batch())
    params = [p for n, p in student.named_parameters() if "one2one" in n]
    grads = torch.autograd.grad(loss[-1], params, allow_unused=True)
    return sum(float(g.abs().sum()) for g in grads if g is not None)


@pytest.mark.parametrize("method", ["ld", "rm", "pfi", "pgd", "fitnet"])
def test_one2one_head_is_distilled_from_an_end_to_end_teacher(method):
    student, _, crit = setup(method, "yolo26s.yaml")
    assert crit.branches == ["one2many", "one2one"]
    assert kd_grad_on_one2one_head(student, crit) > 0


@pytest.mark.parametrize("teacher_cfg,one2one", [("yolo26s.yaml", False), ("yolov8s.yaml", True)])
def test_one2many_only_when_switched_off_or_the_teacher_has_no_one2one_branch(teacher_cfg, one2one):
    student, _, crit = setup("ld", teacher_cfg, one2one=one2one)
    assert crit.branches == ["one2many"]
    assert kd_grad_on_one2one_head(student, crit) == 0


def test_neck_level_methods_run_once():
    student, _, crit = setup("dfd", "yolo26s.yaml")
    assert kd_grad_on_one2one_head(student, crit) == 0  # dfd reads the neck: nothing of it reaches the o2o head


def test_terms_are_weighted_like_the_two_task_losses():
    # ld_cls logged = o2m * ld_cls(one2many) + o2o * ld_cls(one2one), with E2ELoss's own weights of this epoch.
    student, teacher, crit = setup("ld", "yolo26s.yaml", ld_assign="student")
    crit.task.o2m, crit.task.o2o = 0.3, 0.7
    student.train()
    b = batch()
    preds = student(b["img"])
    _, items = crit(preds, b)
    s = crit.student_taps.collect(preds).float()
    with torch.no_grad():
        t = crit.teacher_taps.collect(raw_forward(teacher, b["img"])).float()
    ld = crit.methods.methods["ld"]
    on_o2m = ld(s, t, StepContext(batch=b, assign=crit.recorders["one2many"].last))["cls"]
    on_o2o = ld(s.one2one, t.one2one, StepContext(batch=b, assign=crit.recorders["one2one"].last))["cls"]
    assert not torch.isclose(on_o2m, on_o2o)
    assert torch.isclose(items["ld_cls"], 0.3 * on_o2m + 0.7 * on_o2o, rtol=1e-5)


def test_label_assignment_distillation_assigns_each_branch_from_the_teachers_matching_branch():
    student, teacher, crit = setup("ld", "yolo26s.yaml", ld_assign="teacher")
    student.train()
    b = batch()
    crit(student(b["img"]), b)
    with torch.no_grad():
        t = crit.teacher_taps.collect(raw_forward(teacher, b["img"])).float()
    for branch, t_branch in (("one2many", t), ("one2one", t.one2one)):
        recorded = crit.recorders[branch].last
        expected = assign_like(assigner_of(crit.task, branch), t_branch, recorded)
        assert torch.equal(recorded.fg_mask, expected.fg_mask)
        assert torch.allclose(recorded.target_scores, expected.target_scores)
    one2one = crit.recorders["one2one"].last  # top-1: one positive per ground-truth box at most
    assert one2one.fg_mask.sum() <= 3
