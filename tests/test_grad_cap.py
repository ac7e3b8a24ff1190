"""`kd_grad_ratio`: the gradient-share cap at the student's tapped tensors (yolokd/criterion.py, GradientShareCap)."""

from types import SimpleNamespace

import pytest
import torch

from helpers import student_step
from yolokd.config import kd_defaults
from yolokd.criterion import GradientShareCap
from yolokd.taps import Features


def one_map(y: torch.Tensor) -> Features:
    """Features whose only differentiable tensor is the neck map `y` (1, C, 1, 1)."""
    return Features(neck=[y], scores=torch.zeros(1, 1, 1), boxes=torch.zeros(1, 4, 1), strides=torch.tensor([8.0]),
                    dfl=torch.nn.Identity())


def toy_grad(ratio: float) -> tuple[torch.Tensor, GradientShareCap]:
    """w -> y = 3 w; task = <y, (1, 0)>, KD = <gated y, (0, 4)>: at y, |g_task| = 1 and |g_kd| = 4."""
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    y = (3 * w).view(1, 2, 1, 1)
    cap = GradientShareCap(ratio)
    gated = cap.gate(one_map(y)).neck[0]
    task = (y.flatten() * torch.tensor([1.0, 0.0])).sum()
    kd = (gated.flatten() * torch.tensor([0.0, 4.0])).sum()
    (task + kd).backward()
    return w.grad, cap


def test_kd_gradient_is_scaled_to_the_ratio_of_the_task_gradient():
    # ratio 0.5: factor = 0.5 * 1 / 4 = 1/8, so dL/dy = (1, 0) + (0, 4) / 8 = (1, 0.5) and dL/dw = 3 * that
    grad, cap = toy_grad(0.5)
    assert torch.allclose(grad, torch.tensor([3.0, 1.5]))
    assert cap.take_factors().item() == pytest.approx(0.125) and cap.take_factors() is None  # taken once
    assert list(cap.pulls) == ["neck[0]"] and cap.pulls["neck[0]"].item() == pytest.approx(4.0)  # before the cap


def test_kd_gradient_within_the_ratio_passes_unchanged():
    grad, cap = toy_grad(10.0)  # 4 <= 10 * 1: never scaled up, the plain sum's gradient
    assert torch.allclose(grad, torch.tensor([3.0, 12.0]))
    assert cap.take_factors().item() == 1.0


def test_adapter_between_gate_and_loss_keeps_its_own_gradient():
    """The cap scales what enters the student; an adapter after the gate learns from the full KD gradient."""
    y = torch.tensor([2.0, -1.0], requires_grad=True).mul(1.0).view(1, 2, 1, 1)
    adapter = torch.tensor([0.5, 0.5], requires_grad=True)
    gated = GradientShareCap(1e-6).gate(one_map(y)).neck[0]
    ((y.flatten() * 0.1).sum() + 100 * (adapter * gated.flatten()).sum()).backward()
    assert torch.allclose(adapter.grad, torch.tensor([200.0, -100.0]))  # 100 * y, not scaled


def test_gate_is_identity_forward_and_off_without_grad():
    y = torch.randn(1, 3, 2, 2, requires_grad=True) * 2
    cap = GradientShareCap(0.5)
    assert torch.equal(cap.gate(one_map(y)).neck[0], y)
    with torch.no_grad():
        f = one_map(y.detach())
        assert cap.gate(f) is f  # validation: no gate, no hook


def step_grads(method: str, grad_ratio: float) -> tuple[dict[str, torch.Tensor], object, dict]:
    """One real distillation step of a random yolov8n student (yolov8n teacher): the student's gradients, the
    criterion, and the loss items of a second forward (which reports the first backward's factor)."""
    args = SimpleNamespace(**{**kd_defaults(), "method": method, "kd_max_ratio": 0.0, "kd_grad_ratio": grad_ratio})
    *_, model, loss, _, crit = student_step("yolov8n.yaml", ["a", "b", "c"], args, "yolov8n.yaml")
    loss.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.manual_seed(0)
    img = torch.rand(2, 3, 64, 64)
    batch = {"img": img, "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [2.0]]),
             "bboxes": torch.tensor([[0.3, 0.3, 0.4, 0.3], [0.5, 0.5, 0.6, 0.6]])}
    return grads, crit, crit(model(img), batch)[1]


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """|a - b| / |b| over all the tensors at once (a per-tensor ratio would divide rounding noise by the ~0
    gradients of BatchNorm biases that the next normalisation cancels)."""
    return (torch.cat([(x - y).flatten() for x, y in zip(a, b)]).norm() / torch.cat([y.flatten() for y in b]).norm()).item()


def test_a_vanishing_ratio_leaves_the_student_only_the_uncapped_gradient():
    """dfd+ld with kd_grad_ratio -> 0: the student gets the task's and ld's gradient (ld is task-scaled, never
    gated), exactly what method=ld gives; without the cap dfd's gradient is there too."""
    ld, crit_ld, items_ld = step_grads("ld", 1e-9)
    assert crit_ld.grad_cap is None and "kd_gscale" not in items_ld  # nothing capped: no gate, no column
    capped, crit, items = step_grads("dfd+ld", 1e-9)
    free, _, _ = step_grads("dfd+ld", 0.0)
    assert rel_diff([capped[k] for k in ld], list(ld.values())) < 1e-5
    assert rel_diff([free[k] for k in ld], list(ld.values())) > 1e-2
    assert 0 < items["kd_gscale"].item() < 1e-6  # the first step's backward, reported by the second forward


@pytest.mark.parametrize("method", ["pgd", "dfd"])
def test_yolo26_both_branches_and_the_shared_neck_are_capped(method):
    """YOLO26: the one-to-one branch's tensors and the neck both branches share (one gate per tensor) are capped
    too; with a vanishing ratio every student weight, the deployed head's included, gets the task gradient only."""
    from tests.test_one2one import batch, setup

    grads = {}
    for ratio in (1e-9, 0.0):
        student, _, crit = setup(method, "yolo26n.yaml", kd_max_ratio=0.0, kd_grad_ratio=ratio)
        student.train()
        loss, _ = crit(student(batch()["img"]), batch())
        named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        full = torch.autograd.grad(loss.sum(), [p for _, p in named], retain_graph=True, allow_unused=True)
        task = torch.autograd.grad(loss[:-1].sum(), [p for _, p in named], allow_unused=True)
        pairs = [(n, f, t) for (n, _), f, t in zip(named, full, task) if t is not None]
        grads[ratio] = [rel_diff([f for *_, f, _ in part], [t for *_, t in part])
                        for part in (pairs, [x for x in pairs if "one2one" in x[0]])]
    assert max(grads[1e-9]) < 1e-5 and grads[0.0][0] > 1e-3
    assert (grads[0.0][1] > 1e-3) == (method == "pgd")  # pgd is head-level; dfd reads the neck, which o2o detaches


@pytest.mark.parametrize("methods,args,ratio", [
    (["dfd"], {}, 0.0),  # no method asks for the cap and none is given: off
    (["pdf"], {"pdf_grad_ratio": 0.25}, 0.25),  # the method's own
    (["pdf", "dfd"], {"pdf_grad_ratio": 0.25}, 0.0),  # one cap for all capped terms: dfd has none, so off
    (["pdf", "dfd"], {"pdf_grad_ratio": 0.25, "dfd_grad_ratio": 0.5}, 0.25),  # the smallest of their own
    (["pdf"], {"pdf_grad_ratio": 0.25, "kd_grad_ratio": 0.1}, 0.1),  # kd_grad_ratio given: for every method
    (["pdf"], {"pdf_grad_ratio": 0.25, "kd_grad_ratio": 0}, 0.0),  # 0 turns their own off too
    (["pdf"], {"pdf_grad_ratio": 0.25, "kd_grad_ratio": None}, 0.25),  # left empty: their own
    ([], {"kd_grad_ratio": None}, 0.0),  # no capped method (ld alone)
])
def test_run_grad_ratio_is_kd_grad_ratio_or_the_smallest_own(methods, args, ratio):
    from yolokd.config import run_grad_ratio

    assert run_grad_ratio(methods, args) == ratio
    assert run_grad_ratio(methods, SimpleNamespace(**args)) == ratio  # the trainer's namespace reads the same


@pytest.mark.parametrize("method,cap", [("pdf+ld", 0.25), ("ld", None), ("pdf+dfd", None)])
def test_a_methods_own_ratio_reaches_the_criterion(method, cap):
    """kd_grad_ratio left empty and pdf's own 0.25: pdf+ld is capped at 0.25 (ld's terms are task-scaled and not
    gated), ld alone has nothing to cap, and pdf+dfd is not capped (dfd asks for no cap)."""
    args = SimpleNamespace(**{**kd_defaults(), "method": method, "pdf_grad_ratio": 0.25})
    assert args.kd_grad_ratio is None  # the default: each method's own
    crit = student_step("yolov8n.yaml", ["a", "b", "c"], args, "yolov8n.yaml")[-1]
    assert (crit.grad_cap and crit.grad_cap.ratio) == cap


@pytest.mark.parametrize("given,cap,said", [
    (None, GradientShareCap(0.25), "the gradient of pdf's terms is capped at 0.25 times the task's"),  # their own
    (0.25, GradientShareCap(0.25), None),  # the user's kd_grad_ratio: nothing to explain
    (None, None, None),  # no cap
])
def test_the_trainer_says_when_a_methods_own_cap_acts(given, cap, said, monkeypatch):
    from ultralytics.utils import LOGGER

    from yolokd.trainer import DistillationTrainer

    logs = []
    monkeypatch.setattr(LOGGER, "info", lambda msg, *a, **k: logs.append(msg))
    run = SimpleNamespace(args=SimpleNamespace(kd_grad_ratio=given), distillation=SimpleNamespace(grad_cap=cap),
                          kd_methods=SimpleNamespace(capped_methods=["pdf"]))
    DistillationTrainer._log_own_grad_cap(run)
    assert len(logs) == (said is not None) and all(said in msg for msg in logs)


@pytest.mark.parametrize("method,cap", [("pgd", 0.25), ("pgd+ld", 0.25), ("pdf", 0.25), ("pdf+ld", 0.25),
                                        ("pdf+pgd", 0.25), ("dfd", None), ("pgd+dfd", None), ("pdf+rm", None)])
def test_pdf_and_pgd_ship_with_their_own_cap(method, cap):
    """With the train arguments' defaults, pdf and pgd (alone or with ld) run with their own grad_ratio 0.25
    (cfg/methods/<method>.yaml, each passed a rule written before its confirming seeds, docs/experiments.md); a method
    without one does not, nor a composition with one (the smallest)."""
    from yolokd.config import method_defaults, run_grad_ratio

    assert method_defaults("pgd")["grad_ratio"] == method_defaults("pdf")["grad_ratio"] == 0.25
    capped = [m for m in method.split("+") if m != "ld"]  # ld's terms are task-scaled
    assert (run_grad_ratio(capped, kd_defaults()) or None) == cap
