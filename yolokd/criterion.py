"""The distillation loss: the student's Ultralytics criterion plus the methods' terms, in one call.

`build_distillation` is the one place that wires taps, methods and loss for a student, a teacher and the train
arguments; the trainer, `yolokd overhead` and the tests call it. `DistillationLoss.install` makes it the student's
criterion: the one seam inside the autograd window (inside autocast and the DDP forward) that keeps `trainer.model`
a plain `DetectionModel`, so EMA, validation, checkpoints, export and predict stay vanilla Ultralytics. It is a
plain object, not an `nn.Module`: nothing of it becomes part of the student's state, and a deep copy or pickle of
the student turns it into `None` (see `__reduce__`), which Ultralytics then rebuilds as its own criterion.

How a method's raw term becomes loss, in order (`DistillationLoss.__call__` and `scale_terms`, nowhere else):
1. the method multiplies its raw batch-mean term by its paper weight (`<method>_<key>=` arguments) and returns it;
   `MethodSet` hands it on as a `Term` named `<method>_<term>`, marked `capped` unless the method declares the term
   `task_scaled` (normalised like Ultralytics' own losses: `ld`, FitNets' KD term);
2. YOLO26 (end-to-end head): a head-level term is computed on both branches and mixed like `E2ELoss` mixes its
   two task losses, o2m * T(one2many) + o2o * T(one2one) (see `DistillationLoss`);
3. a non-finite term drops the whole distillation contribution of that step (column `kd_skip`, a warning naming
   the term once), so an inf or NaN never reaches the weights and the cap never multiplies one;
4. `kd_max_ratio`: the capped terms are scaled by one detached factor so that their sum is at most that share of
   the task loss, never up (column `kd_scale`);
5. `kd_ramp` and the fade: each capped term is multiplied by the epoch's schedule factor (`schedule_factor`), with
   its method's fade (`kd_fade` where given, else the method's own `<method>_fade`: `Term.fade`);
6. the sum of all terms is `kd_loss`; it is multiplied by the batch size, as Ultralytics' loss vector is, and
   appended to it;
7. `kd_grad_ratio`, or the methods' own `<method>_grad_ratio` (`run_grad_ratio`), acts in the backward pass rather
   than on the loss: the methods with capped terms read the student's tapped tensors through a `GradientShareCap`,
   which scales their gradient at each tensor to at most that multiple of the task loss's gradient at the same
   tensor (column `kd_gscale`).

With `agreement` on (the trainer's `plots=True`), a diagnostic column `kd_agree` (`kd_agreement`) is logged beside
them; it is no loss and costs nothing when off.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch import nn
from ultralytics.utils import LOGGER

from yolokd.checks import dry_forward
from yolokd.config import kd_defaults, run_grad_ratio
from yolokd.methods.base import MethodSet, StepContext, Term, get_method
from yolokd.taps import (
    BRANCHES,
    Features,
    Taps,
    _AssignmentRecorder,
    _TeacherAssignment,
    assign_like,
    assigner_of,
    head_of,
    raw_forward,
)


def schedule_factor(epoch: int, epochs: int, ramp: float, fade: float) -> float:
    """The epoch's factor on the capped terms: `kd_ramp` at the start times `kd_fade` at the end.

    ramp(e) = min(1, (e + 1) / (ramp * E)) for the 0-based epoch e of E: with E = 8 and ramp = 0.5 the epochs 1..4
    get 0.25, 0.5, 0.75, 1 (a feature term whose gradient points elsewhere than the task's at random init comes in
    as the student learns; docs/benchmarks.md, gradient share). fade(e) = clip((E - 1 - e) / (fade * E), 0, 1): with
    E = 8 and fade = 0.5 the epochs 5..8 get 0.75, 0.5, 0.25, 0 (early-stopped distillation, Cho & Hariharan, ICCV
    2019, "On the efficacy of knowledge distillation", made gradual). 0 turns either off (constant weights, as in
    the papers).
    """
    if epochs <= 0:
        return 1.0
    up = min(1.0, (epoch + 1) / (ramp * epochs)) if ramp > 0 else 1.0
    down = min(1.0, max(0.0, (epochs - 1 - epoch) / (fade * epochs))) if fade > 0 else 1.0
    return up * down


def scale_terms(terms: dict[str, Term], task: torch.Tensor, max_ratio: float,
                schedule: Callable[[float], float] = lambda fade: 1.0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Steps 4-5 of the module docstring: cap, then fade, the `capped` terms; the others pass unchanged.

    The cap is a safety valve for loss scale: a paper's weights were tuned for other features (mmdet FPNs, 640 px,
    two-stage heads); with YOLO features the same weights can make the KD term many times the task loss, and the
    student ends worse than without a teacher. The factor is `max_ratio * task / sum(capped)`, at most 1, detached
    (it scales gradients, not their directions); `max_ratio <= 0` does not cap. `schedule(fade)` is the epoch's
    factor for a term of that fade (`schedule_factor` with `kd_ramp`), applied after the cap: the cap bounds the
    capped terms' sum, and the fade then lowers each method's terms by its own factor.

    Returns:
        the terms' values, and the cap's factor (a detached scalar, 1 when the cap does not bind or is off), which
        the criterion logs as `kd_scale`: while it stays below 1, the methods' own weights only set ratios.
    """
    capped = [t.value for t in terms.values() if t.capped]
    scale = task.new_ones(()).detach()
    if capped and max_ratio > 0:
        kd = torch.stack(capped).sum().detach()
        scale = (max_ratio * task.detach() / kd.clamp_min(1e-12)).clamp(max=1.0)
    return {k: t.value * (scale * schedule(t.fade)) if t.capped else t.value for k, t in terms.items()}, scale


class _Gate(torch.autograd.Function):
    """Identity forward; backward parks the incoming (distillation) gradient in `slot` and sends nothing on."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slot: list) -> torch.Tensor:
        ctx.slot = slot
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.slot.append(grad)
        return None, None


class GradientShareCap:
    """`kd_grad_ratio`: at every student tensor a method reads, the distillation gradient may be at most `ratio`
    times as large (L2 norm over the tensor) as the task loss's gradient at the same tensor.

    The loss cap (`kd_max_ratio`) bounds a term's value, not its pull: on a student at random init, `rm` capped at a
    quarter of the task loss still sends the student's weights a gradient 5.7 times the task's and `pgd` 2.0 times,
    at a cosine near 0 with it (docs/benchmarks.md, gradient share), and under AdamW the larger gradient sets a
    weight's step. This bounds the pull where it enters the student. `gate(s)` returns a view of the tapped features
    whose tensors are identities in the forward pass; in the backward pass each identity parks the distillation
    gradient g_kd that reaches it, and a hook on the student's own tensor, which fires once the task gradient g_task
    has arrived there too (autograd runs every consumer of a tensor before its hook), passes on
    g_task + g_kd * min(1, ratio * |g_task| / |g_kd|). Adapters sit between the gate and the loss, so their own
    gradients are not scaled. Under AMP both gradients carry the same loss scale, so the factor does not depend on it.
    The factors of a backward pass are kept in `factors` (`take_factors` empties it): the criterion logs their mean,
    one step late, as `kd_gscale`. `pulls` holds, per tensor (`neck[0]` = P3, `cls_feat[2]`, `one2one.scores`...),
    the last |g_kd| / |g_task| before the cap, for `yolokd explain`.
    """

    def __init__(self, ratio: float):
        self.ratio = ratio
        self.factors: list[torch.Tensor] = []
        self.pulls: dict[str, torch.Tensor] = {}

    def gate(self, f: Features) -> Features:
        """`f` with each tensor that requires grad passed through a gate (one gate per tensor: YOLO26's one-to-one
        branch shares the neck of the one-to-many one)."""
        if not torch.is_grad_enabled():
            return f
        memo: dict[int, torch.Tensor] = {}

        def one(x: torch.Tensor, label: str) -> torch.Tensor:
            if not x.requires_grad:
                return x
            if id(x) not in memo:
                slot: list[torch.Tensor] = []
                x.register_hook(functools.partial(self._merge, slot, label))
                memo[id(x)] = _Gate.apply(x, slot)
            return memo[id(x)]

        def gated(g: Features, pre: str = "") -> Features:
            maps = {k: [one(x, f"{pre}{k}[{i}]") for i, x in enumerate(getattr(g, k))]
                    for k in ("neck", "cls_feat", "box_feat")}
            return dataclasses.replace(g, **maps, scores=one(g.scores, f"{pre}scores"),
                                       boxes=one(g.boxes, f"{pre}boxes"),
                                       one2one=None if g.one2one is None else gated(g.one2one, "one2one."))

        return gated(f)

    def _merge(self, slot: list[torch.Tensor], label: str, g_task: torch.Tensor) -> torch.Tensor | None:
        """The hook on a tapped tensor: its task gradient plus the parked distillation gradient, scaled."""
        if not slot:
            return None
        g_kd = slot.pop()
        pull = g_kd.float().norm() / g_task.float().norm().clamp_min(1e-30)
        factor = self.factor(pull)
        self.pulls[label] = pull.detach()
        self.factors.append(factor.detach())
        return g_task + g_kd * factor.to(g_kd.dtype)

    def factor(self, pull: torch.Tensor) -> torch.Tensor:
        """The cap's factor on a distillation gradient that pulls `pull` = |g_kd| / |g_task| times the task's."""
        return (self.ratio / pull.clamp_min(1e-30)).clamp(max=1.0)

    def take_factors(self) -> torch.Tensor | None:
        """The mean factor of the backward passes since the last call (None if none ran), and forget them."""
        out = torch.stack(self.factors).mean() if self.factors else None
        self.factors = []
        return out


@torch.no_grad()
def kd_agreement(t_scores: torch.Tensor, s_scores: torch.Tensor, confident: float = 0.5) -> torch.Tensor:
    """Column `kd_agree`: how far the student is from the teacher where the teacher is sure of an object.

    The mean of |p_t - p_s| for the teacher's top class c* = argmax_c p_t, over the anchors where p_t(c*) >
    `confident`, with p = sigma(class logits (B, nc, A)); 0 = the student agrees, 1 = it misses every such anchor.
    0 also when the teacher is confident nowhere in the batch.
    """
    p_t, top = t_scores.float().sigmoid().max(1)  # (B, A)
    p_s = s_scores.float().gather(1, top.unsqueeze(1)).squeeze(1).sigmoid()
    sure = p_t > confident
    return ((p_t - p_s).abs() * sure).sum() / sure.sum().clamp_min(1)


def broadcast_from_rank0(module: nn.Module) -> None:
    """Under DDP, give every rank rank 0's parameters and buffers (e.g. adapters initialised on each rank)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for x in [*module.parameters(), *module.buffers()]:
            dist.broadcast(x.data, src=0)


def _branch(t: Features | None, branch: str) -> Features | None:
    """The teacher's features of `branch` (None stays None)."""
    return t if t is None or branch == "one2many" else t.one2one


class DistillationLoss:
    """Task loss of the student + the methods' terms, logged as `kd_loss` and one column per term.

    Args:
        methods: the methods to apply (owns the adapters).
        teacher: the frozen teacher detector (eval mode), or None for teacher-free methods (DICOD).
        teacher_taps: taps on the teacher.
        trainer: read for `epoch` / `epochs` only (the schedule's); without one the terms keep their full weights.
        max_ratio: `kd_max_ratio` (see `scale_terms`).
        ramp: `kd_ramp` (see `schedule_factor`); like the cap and each method's fade (`Term.fade`), it acts on the
            capped terms only.
        one2one: `kd_one2one`: with an end-to-end student (YOLO26), also distil its one-to-one head (see below).
        agreement: log `kd_agree` (`kd_agreement`, needs a detector teacher); the trainer sets it to `plots`.
        grad_ratio: the run's cap (`run_grad_ratio`: `kd_grad_ratio`, or the methods' own; see `GradientShareCap`);
            0 = off.

    End-to-end students. `E2ELoss` trains the one-to-many branch (dense assignment, top-10) and the one-to-one
    branch (the head that is deployed, top-1) with the weights `o2m` + `o2o` = 1, moving from 0.8/0.2 to 0.1/0.9
    over the run. With `one2one` and a teacher that has a one-to-one branch too (or no detector teacher, DICOD),
    each `head_level` method is computed on both branches (student one-to-one against teacher one-to-one, with the
    one-to-one assignment) and its terms weighted the same way, o2m * T(one2many) + o2o * T(one2one); LAD assigns
    both branches from the teacher's matching branch. Neck-level methods read the shared neck once. A teacher without
    a one-to-one branch (v8/11 teaching 26) has no one-to-one targets to give: only one-to-many is distilled.
    """

    def __init__(self, methods: MethodSet, teacher: nn.Module | None, teacher_taps: Taps | None, trainer=None,
                 max_ratio: float = 0.0, ramp: float = 0.0, one2one: bool = True,
                 agreement: bool = False, grad_ratio: float = 0.0):
        self.methods, self.teacher, self.teacher_taps, self.trainer = methods, teacher, teacher_taps, trainer
        self.grad_cap = GradientShareCap(grad_ratio) if grad_ratio > 0 and methods.caps_any_term else None
        self.max_ratio, self.ramp = max_ratio, ramp
        self.one2one, self.agreement = one2one, agreement
        self.task = self.student_taps = None
        self.branches: list[str] = []
        self.recorders: dict[str, _AssignmentRecorder] = {}
        self.teacher_assignment: dict[str, _TeacherAssignment] = {}
        self._handles = []
        self._warned: set[str] = set()

    def install(self, student: nn.Module) -> DistillationLoss:
        """Become `student`'s criterion, wrapping its Ultralytics one, and hook its head and assigners."""
        self.task = getattr(student, "criterion", None) or student.init_criterion()
        self.student_taps = Taps(student, self.methods.taps)
        teacher_has_o2o = self.teacher is None or getattr(head_of(self.teacher), "one2one_cv2", None) is not None
        self.branches = [b for b in BRANCHES if assigner_of(self.task, b) is not None
                         and (b == "one2many" or (self.one2one and teacher_has_o2o))]
        self.recorders = {b: _AssignmentRecorder() for b in self.branches}
        self._handles = [assigner_of(self.task, b).register_forward_hook(self.recorders[b]) for b in self.branches]
        if self.teacher is not None and self.methods.teacher_assigns:
            self.teacher_assignment = {b: _TeacherAssignment() for b in self.branches}
            self._handles += [assigner_of(self.task, b).register_forward_pre_hook(self.teacher_assignment[b])
                              for b in self.branches]
        student.criterion = self
        return self

    @property
    def assignment(self) -> _AssignmentRecorder:
        """The recorder of the one-to-many assignment (the student's task assignment of a plain head)."""
        return self.recorders["one2many"]

    def __call__(self, preds, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Ultralytics criterion contract: `(loss_vector * batch_size, {name: detached scalar})`."""
        t = None
        if self.teacher is not None:
            with torch.no_grad():  # fp32 once per step, shared by the assignment, the fit and the terms
                t = self.teacher_taps.collect(raw_forward(self.teacher, batch["img"])).float()
        for b, hook in self.teacher_assignment.items():
            hook.set(_branch(t, b))
        try:
            loss, items = self.task(preds, batch)
        finally:
            for hook in self.teacher_assignment.values():
                hook.clear()
        raw = self.student_taps.collect(preds)
        s = raw.float()
        s_capped = self.grad_cap.gate(raw).float() if self.grad_cap else s  # read by the methods with capped terms
        n = batch["img"].shape[0]
        with torch.autocast(batch["img"].device.type, enabled=False):
            if self.methods.fit_adapters(s, t):
                broadcast_from_rank0(self.methods)
            terms = self._branch_terms(s, s_capped, t, batch)
            bad = []
            if not torch.isfinite(torch.stack([v.value for v in terms.values()])).all():  # one sync per step
                bad = [k for k, v in terms.items() if not torch.isfinite(v.value)]
            if bad:  # step 3: drop this step's distillation; nothing non-finite enters the graph
                self._warn_once(bad)
                terms = {k: dataclasses.replace(v, value=torch.zeros((), device=v.value.device))
                         for k, v in terms.items()}
            schedule = (functools.partial(schedule_factor, self._epoch, self._epochs, self.ramp) if self.trainer
                        else lambda fade: 1.0)  # outside training (`yolokd explain`, `overhead`): full weights
            values, scale = scale_terms(terms, loss.detach().float().sum() / n, self.max_ratio, schedule)
        kd = torch.stack(list(values.values())).sum()
        items = {**items, "kd_loss": kd.detach()}
        if len(values) > 1:
            items.update({k: v.detach() for k, v in values.items()})
        if self.max_ratio > 0 and self.methods.caps_any_term:
            items["kd_scale"] = scale
        if self.grad_cap:
            factor = self.grad_cap.take_factors()  # of the previous step's backward pass
            items["kd_gscale"] = kd.new_ones(()) if factor is None else factor
        items["kd_skip"] = kd.new_tensor(float(bool(bad)))
        if self.agreement and t is not None:
            items["kd_agree"] = kd_agreement(t.scores, s.scores)
        return torch.cat([loss, (kd * n).view(1).to(loss.dtype)]), items

    def _warn_once(self, columns: list[str]) -> None:
        new = [c for c in columns if c not in self._warned]
        if new:
            self._warned.update(new)
            LOGGER.warning(f"yolokd: {', '.join(new)} not finite at epoch {self._epoch + 1}: this step's distillation "
                           "terms are dropped (the share of dropped steps is the kd_skip column). Lower the method's "
                           "weights or check the teacher if it recurs.")

    @property
    def _epoch(self) -> int:
        return getattr(self.trainer, "epoch", 0)

    @property
    def _epochs(self) -> int:
        return getattr(self.trainer, "epochs", 1)

    def _context(self, branch: str, t: Features | None, batch: dict) -> StepContext:
        """The step's facts for one branch: its recorded assignment, and the teacher's assignment of it when a
        method asks for the teacher's positives (under LAD the task assignment already is the teacher's)."""
        assign = self.recorders[branch].last
        teacher_assign = None
        if self.methods.needs_teacher_positives and t is not None and assign is not None:
            teacher_assign = assign if branch in self.teacher_assignment else assign_like(
                assigner_of(self.task, branch), t, assign)
        return StepContext(batch=batch, assign=assign, teacher_assign=teacher_assign, epoch=self._epoch,
                           epochs=self._epochs, branch=branch)

    def _branch_terms(self, s: Features, s_capped: Features, t: Features | None, batch: dict) -> dict[str, Term]:
        """Steps 1-2 of the module docstring: the methods' terms on the one-to-many branch, plus, for an end-to-end
        student, the head-level terms on the one-to-one branch, weighted like `E2ELoss` weights its task losses.
        `s_capped`: the student's features as the methods with capped terms read them (step 7)."""
        terms = self.methods(s, t, self._context("one2many", t, batch), capped_view=s_capped)
        if "one2one" not in self.branches:
            return terms
        t2 = _branch(t, "one2one")
        o2o = self.methods(s.one2one, t2, self._context("one2one", t2, batch), head_only=True,
                           capped_view=s_capped.one2one)
        w_m, w_o = self.task.o2m, self.task.o2o
        return {k: dataclasses.replace(v, value=w_m * v.value + w_o * o2o[k].value) if k in o2o else v
                for k, v in terms.items()}

    def update(self):
        """Forward the per-epoch schedule update of end-to-end criteria (`E2ELoss.update`)."""
        if hasattr(self.task, "update"):
            self.task.update()

    def remove(self):
        """Detach the hooks this loss registered (the teacher's and student's taps, the assigner hooks)."""
        for h in self._handles:
            h.remove()
        self.student_taps.remove()
        if self.teacher_taps is not None:
            self.teacher_taps.remove()

    def __getattr__(self, name):
        """Anything else (e.g. `one2many`, `hyp`) is the wrapped criterion's, for Ultralytics code that reads it."""
        if name == "task":  # not yet set (during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.task, name)

    def __reduce__(self):
        """Copies and pickles of a student holding this loss get `criterion=None`: the teacher never travels."""
        return type(None), ()


def build_distillation(names: list[str], student: nn.Module, teacher: nn.Module | None, args,
                       trainer=None, device: torch.device | str | None = None) -> DistillationLoss:
    """The distillation of `student` by `teacher` (frozen, or None) with the methods `names` and the train
    arguments `args` (a namespace with yolokd's keys: `kd_max_ratio`, `kd_ramp`, `kd_one2one`, `kd_grad_ratio`, and
    `kd_fade` and the methods', which `MethodSet` reads),
    its adapters on `device` (default: the student's).

    The methods' adapters are sized from one dry forward of each model. Nothing is hooked on the student until
    `install(student)`: the trainer installs it after Ultralytics has copied the student into its EMA.
    """
    imgsz = max(64, 2 * int(student.stride.max()))
    wanted = set().union(*(get_method(n).taps for n in names))
    s_taps = Taps(student, wanted)
    s_feats = s_taps.collect(dry_forward(student, imgsz))
    s_taps.remove()
    teacher_taps = t_feats = None
    if teacher is not None:
        teacher_taps = Taps(teacher, wanted)
        t_feats = teacher_taps.collect(dry_forward(teacher, imgsz))
    methods = MethodSet(names, s_feats, t_feats, args).to(device or next(student.parameters()).device)
    defaults = kd_defaults()  # for a namespace without yolokd's keys (Python callers): cfg/default.yaml's values
    arg = lambda key: getattr(args, key, defaults[key])  # noqa: E731
    return DistillationLoss(methods, teacher, teacher_taps, trainer, max_ratio=float(arg("kd_max_ratio") or 0.0),
                            ramp=float(arg("kd_ramp") or 0.0), one2one=bool(arg("kd_one2one")),
                            grad_ratio=run_grad_ratio(methods.capped_methods, args))
