"""`DistillationLoss`: the student's Ultralytics criterion plus the distillation terms, in one call.

The trainer installs it as `student.criterion`. That is the one seam inside the autograd window (inside autocast
and the DDP forward), and it keeps `trainer.model` a plain `DetectionModel`, so EMA, validation, checkpoints,
export and predict stay vanilla Ultralytics. It is a plain object, not an `nn.Module`: nothing of it becomes part
of the student's state, and a deep copy or pickle of the student turns it into `None` (see `__reduce__`), which
Ultralytics then rebuilds as its own criterion.
"""

from __future__ import annotations

import torch
from torch import nn

from yolokd.methods.base import MethodSet, StepContext
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


def _branch(t: Features | None, branch: str) -> Features | None:
    """The teacher's features of `branch` (None stays None)."""
    return t if t is None or branch == "one2many" else t.one2one


def fade_factor(epoch: int, epochs: int, fade: float) -> float:
    """`kd_fade`: 1 until the last `fade` share of the epochs, then falling linearly, epoch by epoch, to 0 in the last.

    factor(e) = clip((E - 1 - e) / (fade * E), 0, 1) for the 0-based epoch e of E: with E = 8 and fade = 0.5 the
    epochs 5..8 get 0.75, 0.5, 0.25, 0. `fade <= 0` gives 1 throughout (constant weights, as in the papers).
    Early-stopped distillation (Cho & Hariharan, ICCV 2019, "On the efficacy of knowledge distillation"), made gradual.
    """
    if fade <= 0 or epochs <= 0:
        return 1.0
    return min(1.0, max(0.0, (epochs - 1 - epoch) / (fade * epochs)))


def cap_ratio(terms: dict[str, torch.Tensor], task: torch.Tensor, max_ratio: float,
              exempt: frozenset[str] = frozenset(), weight: float = 1.0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale the terms by one detached factor so that their sum is at most `max_ratio * task` (never scaled up).

    A safety valve for loss scale: a paper's weights were tuned for other features (mmdet FPNs, 640 px, two-stage
    heads); with YOLO features the same weights can make the KD term many times the task loss, and the student
    ends worse than without a teacher. Terms named in `exempt` (methods normalised like the task loss itself,
    `DistillMethod.task_scaled`) are neither counted nor scaled. `max_ratio <= 0` does not cap. The capped terms
    are then multiplied by `weight` (the `kd_fade` schedule, `fade_factor`).

    Returns:
        the terms, and the cap's scale factor (a detached scalar, 1 when the cap does not bind or is off), which the
        criterion logs as `kd_scale`: when it stays below 1, the methods' own weights only set ratios between terms.
    """
    capped = [k for k in terms if k not in exempt]
    scale = task.new_ones(())
    if not capped or (max_ratio <= 0 and weight == 1.0):
        return terms, scale
    if max_ratio > 0:
        kd = torch.stack([terms[k] for k in capped]).sum().detach()
        scale = (max_ratio * task.detach() / kd.clamp_min(1e-12)).clamp(max=1.0)
    return {k: v if k in exempt else v * (scale * weight) for k, v in terms.items()}, scale


def broadcast_from_rank0(module: nn.Module) -> None:
    """Under DDP, give every rank rank 0's parameters and buffers (adapters fitted on each rank's own batch)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for x in [*module.parameters(), *module.buffers()]:
            dist.broadcast(x.data, src=0)


class DistillationLoss:
    """Task loss of the student + sum of the methods' weighted terms, logged as `kd_loss` and one column per term.

    Args:
        task: the student's own Ultralytics criterion (`v8DetectionLoss` or `E2ELoss`).
        student_taps: taps on the student.
        teacher: the frozen teacher detector (eval mode), or None for teacher-free methods / plain training.
        teacher_taps: taps on the teacher.
        methods: the methods to apply (owns the adapters); None trains a plain student.
        trainer: read for `epoch` / `epochs` only.
        max_ratio: `kd_max_ratio` (see `cap_ratio`).
        fade: `kd_fade` (see `fade_factor`); like the cap, it acts on the terms of methods that are not `task_scaled`.
        one2one: `kd_one2one`: with an end-to-end student (YOLO26), also distil its one-to-one head (see below).

    End-to-end students. `E2ELoss` trains the one-to-many branch (dense assignment, top-10) and the one-to-one
    branch (the head that is deployed, top-1) with the weights `o2m` + `o2o` = 1, moving from 0.8/0.2 to 0.1/0.9
    over the run. With `one2one` and a teacher that has a one-to-one branch too (or no detector teacher, DICOD),
    each `head_level` method is computed on both branches (student one-to-one against teacher one-to-one, with the
    one-to-one assignment) and its terms weighted the same way, o2m * T(one2many) + o2o * T(one2one); LAD assigns
    both branches from the teacher's matching branch. Neck-level methods read the shared neck once. A teacher without
    a one-to-one branch (v8/11 teaching 26) has no one-to-one targets to give: only one-to-many is distilled.
    """

    def __init__(self, task, student_taps: Taps, teacher: nn.Module | None, teacher_taps: Taps | None,
                 methods: MethodSet | None, trainer=None, max_ratio: float = 0.0, fade: float = 0.0,
                 one2one: bool = True):
        self.task, self.student_taps, self.max_ratio, self.fade = task, student_taps, max_ratio, fade
        self.teacher, self.teacher_taps, self.methods, self.trainer = teacher, teacher_taps, methods, trainer
        teacher_has_o2o = teacher is None or getattr(head_of(teacher), "one2one_cv2", None) is not None
        self.branches = [b for b in BRANCHES if assigner_of(task, b) is not None
                         and (b == "one2many" or (one2one and teacher_has_o2o))]
        self.recorders = {b: _AssignmentRecorder() for b in self.branches}
        self._handles = [assigner_of(task, b).register_forward_hook(self.recorders[b]) for b in self.branches]
        self.teacher_assignment: dict[str, _TeacherAssignment] = {}
        if teacher is not None and methods is not None and methods.teacher_assigns:
            self.teacher_assignment = {b: _TeacherAssignment() for b in self.branches}
            self._handles += [assigner_of(task, b).register_forward_pre_hook(self.teacher_assignment[b])
                              for b in self.branches]

    @property
    def assignment(self) -> _AssignmentRecorder:
        """The recorder of the one-to-many assignment (the student's task assignment of a plain head)."""
        return self.recorders["one2many"]

    def __call__(self, preds, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Ultralytics criterion contract: `(loss_vector * batch_size, {name: detached scalar})`."""
        if self.methods is None:
            return self.task(preds, batch)
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
        s = self.student_taps.collect(preds).float()
        with torch.autocast(batch["img"].device.type, enabled=False):
            if self.methods.fit_adapters(s, t):
                broadcast_from_rank0(self.methods)
            terms = self._branch_terms(s, t, batch)
            terms, scale = cap_ratio(terms, loss.detach().float().sum() / batch["img"].shape[0], self.max_ratio,
                                     self.methods.task_scaled_columns(terms), fade_factor(self._epoch, self._epochs,
                                                                                          self.fade))
        kd = torch.stack(list(terms.values())).sum()
        items = {**items, "kd_loss": kd.detach()}
        if len(terms) > 1:
            items.update({k: v.detach() for k, v in terms.items()})
        if self.max_ratio > 0 and len(self.methods.task_scaled_columns(terms)) < len(terms):
            items["kd_scale"] = scale.detach()
        return torch.cat([loss, (kd * batch["img"].shape[0]).view(1).to(loss.dtype)]), items

    @property
    def _epoch(self) -> int:
        return getattr(self.trainer, "epoch", 0)

    @property
    def _epochs(self) -> int:
        return getattr(self.trainer, "epochs", 1)

    def _context(self, branch: str, s: Features, t: Features | None, batch: dict) -> StepContext:
        """The step's facts for one branch: its recorded assignment, and the teacher's assignment of it when a
        method asks for the teacher's positives (under LAD the task assignment already is the teacher's)."""
        assign = self.recorders[branch].last
        teacher_assign = None
        if self.methods.needs_teacher_positives and t is not None and assign is not None:
            teacher_assign = assign if branch in self.teacher_assignment else assign_like(
                assigner_of(self.task, branch), t, assign)
        return StepContext(batch=batch, assign=assign, teacher_assign=teacher_assign, epoch=self._epoch,
                           epochs=self._epochs, branch=branch)

    def _branch_terms(self, s: Features, t: Features | None, batch: dict) -> dict[str, torch.Tensor]:
        """The methods' terms on the one-to-many branch, plus, for an end-to-end student, the head-level terms on
        the one-to-one branch, weighted like `E2ELoss` weights the two task losses (see the class docstring)."""
        terms = self.methods(s, t, self._context("one2many", s, t, batch))
        if "one2one" not in self.branches:
            return terms
        s2, t2 = s.one2one, _branch(t, "one2one")
        o2o = self.methods(s2, t2, self._context("one2one", s2, t2, batch), head_only=True)
        w_m, w_o = self.task.o2m, self.task.o2o
        return {k: w_m * v + w_o * o2o[k] if k in o2o else v for k, v in terms.items()}

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
