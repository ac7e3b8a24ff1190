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
from yolokd.taps import Taps, _AssignmentRecorder, _TeacherAssignment, assigner_of, raw_forward


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
              exempt: frozenset[str] = frozenset(), weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Scale the terms by one detached factor so that their sum is at most `max_ratio * task` (never scaled up).

    A safety valve for loss scale: a paper's weights were tuned for other features (mmdet FPNs, 640 px, two-stage
    heads); with YOLO features the same weights can make the KD term many times the task loss, and the student
    ends worse than without a teacher. Terms named in `exempt` (methods normalised like the task loss itself,
    `DistillMethod.task_scaled`) are neither counted nor scaled. `max_ratio <= 0` does not cap. The capped terms
    are then multiplied by `weight` (the `kd_fade` schedule, `fade_factor`).
    """
    capped = [k for k in terms if k not in exempt]
    if not capped or (max_ratio <= 0 and weight == 1.0):
        return terms
    scale = 1.0
    if max_ratio > 0:
        kd = torch.stack([terms[k] for k in capped]).sum().detach()
        scale = (max_ratio * task.detach() / kd.clamp_min(1e-12)).clamp(max=1.0)
    return {k: v if k in exempt else v * (scale * weight) for k, v in terms.items()}


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
    """

    def __init__(self, task, student_taps: Taps, teacher: nn.Module | None, teacher_taps: Taps | None,
                 methods: MethodSet | None, trainer=None, max_ratio: float = 0.0, fade: float = 0.0):
        self.task, self.student_taps, self.max_ratio, self.fade = task, student_taps, max_ratio, fade
        self.teacher, self.teacher_taps, self.methods, self.trainer = teacher, teacher_taps, methods, trainer
        self.assignment = _AssignmentRecorder()
        self._assign_handle = assigner_of(task).register_forward_hook(self.assignment)
        self.teacher_assignment = None
        if teacher is not None and methods is not None and methods.teacher_assigns:
            self.teacher_assignment = _TeacherAssignment()
            self._teacher_assign_handle = assigner_of(task).register_forward_pre_hook(self.teacher_assignment)

    def __call__(self, preds, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Ultralytics criterion contract: `(loss_vector * batch_size, {name: detached scalar})`."""
        if self.methods is None:
            return self.task(preds, batch)
        t = None
        if self.teacher is not None:
            with torch.no_grad():  # fp32 once per step, shared by the assignment, the fit and the terms
                t = self.teacher_taps.collect(raw_forward(self.teacher, batch["img"])).float()
        if self.teacher_assignment is not None:
            self.teacher_assignment.set(t)
        try:
            loss, items = self.task(preds, batch)
        finally:
            if self.teacher_assignment is not None:
                self.teacher_assignment.clear()
        s = self.student_taps.collect(preds).float()
        ctx = StepContext(batch=batch, assign=self.assignment.last,
                          epoch=getattr(self.trainer, "epoch", 0), epochs=getattr(self.trainer, "epochs", 1))
        with torch.autocast(batch["img"].device.type, enabled=False):
            if self.methods.fit_adapters(s, t):
                broadcast_from_rank0(self.methods)
            terms = self.methods(s, t, ctx)
            terms = cap_ratio(terms, loss.detach().float().sum() / batch["img"].shape[0], self.max_ratio,
                              self.methods.task_scaled_columns(terms), fade_factor(ctx.epoch, ctx.epochs, self.fade))
        kd = torch.stack(list(terms.values())).sum()
        items = {**items, "kd_loss": kd.detach()}
        if len(terms) > 1:
            items.update({k: v.detach() for k, v in terms.items()})
        return torch.cat([loss, (kd * batch["img"].shape[0]).view(1).to(loss.dtype)]), items

    def update(self):
        """Forward the per-epoch schedule update of end-to-end criteria (`E2ELoss.update`)."""
        if hasattr(self.task, "update"):
            self.task.update()

    def remove(self):
        """Detach the hooks this loss registered (the teacher's and student's taps, the assigner hook)."""
        self._assign_handle.remove()
        if self.teacher_assignment is not None:
            self._teacher_assign_handle.remove()
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
