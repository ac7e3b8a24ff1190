"""`DistillationTrainer`: Ultralytics' `DetectionTrainer` with a frozen teacher and distillation losses.

    from ultralytics import YOLO
    from yolokd import DistillationTrainer
    YOLO("yolov8n.yaml").train(trainer=DistillationTrainer, teacher="teacher.pt", method="dfd", data="synthetic")

What it changes, and where (everything else is the Ultralytics training loop, untouched):
- `__init__`: merges yolokd's arguments into the config and runs every check before Ultralytics creates the run
  folder; resolves `data=synthetic`.
- `setup_model`: loads and freezes the teacher, builds the distillation (`build_distillation`: the methods' adapters
  sized from a dry forward pass), restores the adapters on `resume=True`.
- `build_optimizer`: adds the adapters' parameters to Ultralytics' parameter groups (same lr schedule, decay rules).
- `_setup_train`: installs `DistillationLoss` as the student's criterion (after EMA creation, so the EMA and the
  checkpoints never see it).
- `optimizer_step`: averages the adapters' gradients across DDP ranks (DDP only wraps the student).
- `save_model`: writes the adapters to `weights/kd_state.pt`, beside the plain student checkpoint.
- `get_validator`: hands the validator Ultralytics' arguments only.
"""

from __future__ import annotations

import torch
from torch import distributed as dist

from ultralytics.cfg import DEFAULT_CFG, cfg2dict
from ultralytics.data.utils import check_det_dataset
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator
from ultralytics.utils import LOGGER, RANK, colorstr
from ultralytics.utils.torch_utils import unwrap_model

from yolokd.checks import DistillationConfigError, check_classes, check_strides, freeze, load_detector
from yolokd.config import check_kd_types, check_train_keys, full_defaults, split_kd_args
from yolokd.criterion import build_distillation
from yolokd.data.synthetic import resolve_data
from yolokd.methods.base import MethodSet, check_adapter_init, get_method, parse_methods
from yolokd.taps import strip_taps

DEFAULT_METHOD = "ld"  # the method that beat the plain student in docs/benchmarks.md
BUILTIN = "ultralytics"  # method name that hands distillation to Ultralytics' own `distill_model=`
KD_STATE = "kd_state.pt"  # adapters of the run, beside last.pt (named so Ultralytics' `last*.pt` search skips it)


def resolve_method_names(method: str | None, teacher: str | None) -> list[str]:
    """The list of methods to run, from the `method=` and `teacher=` arguments (empty list: plain training)."""
    if not method:
        return [DEFAULT_METHOD] if teacher else []
    names = parse_methods(method)
    if BUILTIN in names and len(names) > 1:
        raise DistillationConfigError(f"method={BUILTIN} runs Ultralytics' own distillation and cannot be combined.")
    if not teacher and any(get_method(n).needs_teacher for n in names):
        raise DistillationConfigError(
            f"method={method} needs a teacher detector: add teacher=path/to/teacher.pt (trained on the same data)."
        )
    return names


class DistillationTrainer(DetectionTrainer):
    """Train a student detector with a frozen teacher (see module docstring). Without `teacher=`: plain training."""

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks=None):
        overrides = dict(overrides or {})
        base = {**full_defaults(), **cfg2dict(cfg)}
        check_train_keys(overrides, base)  # misspelt keys fail first, with the nearest valid names
        if overrides.get("data"):
            overrides["data"] = resolve_data(overrides["data"])
        self.teacher = self.distillation = None
        self._preflight = None if overrides.get("resume") else self._check_inputs(overrides)
        if overrides.get("method") == BUILTIN and not overrides.get("resume"):
            overrides["distill_model"] = overrides["teacher"]  # Ultralytics loads and wraps the teacher itself
        super().__init__(base, overrides, _callbacks)
        if self.kd_method_names and self.args.compile:
            LOGGER.warning("compile=True is not supported with distillation (forward hooks); disabling it.")
            self.args.compile = False

    @property
    def kd_method_names(self) -> list[str]:
        """yolokd methods of this run (from the arguments, so resumed runs get theirs back from the checkpoint)."""
        names = resolve_method_names(getattr(self.args, "method", None), getattr(self.args, "teacher", None))
        return [] if names == [BUILTIN] else names

    def _check_inputs(self, overrides: dict) -> tuple | None:
        """Every check that can fail, before Ultralytics creates the run folder. Returns (teacher, data) or None."""
        _, kd = split_kd_args(overrides)
        check_kd_types(kd)
        teacher_spec = kd.get("teacher")
        names = resolve_method_names(kd.get("method"), teacher_spec)
        if teacher_spec and overrides.get("distill_model"):
            raise DistillationConfigError(
                "teacher= and Ultralytics' distill_model= both distil: use one. yolokd runs Ultralytics' own "
                "distillation as a method too (method=ultralytics, when installed)."
            )
        if not names:
            return None
        check_adapter_init(kd.get("adapter_init", "random"))
        data = check_det_dataset(overrides["data"]) if overrides.get("data") else None
        for n in names:
            get_method(n).check_inputs(overrides, data)
        student_spec = overrides.get("model")
        student = load_detector(student_spec, "student", nc=data and data["nc"]) if student_spec else None
        teacher = None
        if teacher_spec:
            teacher = load_detector(teacher_spec, "teacher", nc=data and data["nc"])
            if data is not None and not str(teacher_spec).endswith((".yaml", ".yml")):
                check_classes(teacher, data, teacher_spec)
            if student is not None:
                check_strides(student, teacher)
        return teacher, student

    # ---------------------------------------------------------------- model, teacher, adapters
    def setup_model(self):
        """Build the student as Ultralytics does, then the frozen teacher and the distillation (its adapters)."""
        ckpt = super().setup_model()
        names = self.kd_method_names
        if not names:
            return ckpt
        teacher = self._preflight[0] if self._preflight else None
        if teacher is None and self.args.teacher:
            teacher = load_detector(self.args.teacher, "teacher", nc=self.data["nc"])
        if teacher is not None:
            check_strides(self.model, teacher)
            self.teacher = freeze(teacher.to(self.device).float())
        self.distillation = build_distillation(names, self.model, self.teacher, self.args, trainer=self,
                                               device=self.device)
        if self.resume:
            self._load_kd_state()
        n_adapt = sum(p.numel() for p in self.kd_methods.parameters() if p.requires_grad)
        LOGGER.info(
            f"{colorstr('yolokd:')} method={'+'.join(names)} teacher={self.args.teacher} "
            f"({n_adapt:,} adapter parameters, trained with the student and never saved in it)"
        )
        return ckpt

    @property
    def kd_methods(self) -> MethodSet | None:
        """The methods of this run (they own the adapters), None for plain training."""
        return self.distillation.methods if self.distillation is not None else None

    def build_optimizer(self, model, *args, **kwargs):
        """Ultralytics' optimizer, with the adapters' weights and biases added to its matching parameter groups."""
        optimizer = super().build_optimizer(model, *args, **kwargs)
        if self.kd_methods is not None:
            tags = {g.get("param_group"): g for g in optimizer.param_groups}  # last group of each tag: normal lr
            for name, p in self.kd_methods.named_parameters():
                if not p.requires_grad:  # frozen parts a method owns (e.g. DICOD's classifier teacher)
                    continue
                tag = ("bias" if name.endswith("bias") else "bn" if p.ndim == 1  # a projector's BatchNorm weights
                       else "muon" if "muon" in tags and p.ndim in {2, 4} else "weight")
                tags[tag]["params"].append(p)
        return optimizer

    def _setup_train(self):
        """Ultralytics' setup, then the distillation loss installed as the student's criterion (after the EMA copy
        is made, so the EMA and the checkpoints never see it)."""
        super()._setup_train()
        if self.distillation is not None:
            self.distillation.install(unwrap_model(self.model))

    # ---------------------------------------------------------------- step, save, resume
    def optimizer_step(self):
        """Average the adapters' gradients over DDP ranks (DDP averages the student's), then Ultralytics' step."""
        if self.kd_methods is not None and self.world_size > 1 and dist.is_initialized():
            for p in self.kd_methods.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        super().optimizer_step()

    def save_model(self):
        """Plain student checkpoints (Ultralytics), plus the adapters in `weights/kd_state.pt` for resuming."""
        if self.ema is not None:
            strip_taps(self.ema.ema)  # an EMA re-copied from the tapped student (NaN recovery) must not carry hooks
        saved = super().save_model()
        if self.kd_methods is not None and RANK in {-1, 0}:
            torch.save(
                {"epoch": self.epoch, "method": "+".join(self.kd_method_names), "adapters": self.kd_methods.state_dict()},
                self.wdir / KD_STATE,
            )
        return saved

    def _load_kd_state(self):
        path = self.wdir / KD_STATE
        if not path.exists():
            LOGGER.warning(f"{path} not found: resuming with freshly initialised adapters.")
            return
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.kd_methods.load_state_dict(state["adapters"])
        LOGGER.info(f"{colorstr('yolokd:')} restored adapters from {path} (epoch {state['epoch'] + 1})")

    def _load_checkpoint_state(self, ckpt):
        """Ultralytics' restore; the EMA it rebuilds from the tapped student is stripped of yolokd hooks."""
        super()._load_checkpoint_state(ckpt)
        strip_taps(self.ema.ema)

    # ---------------------------------------------------------------- validation
    def get_validator(self):
        """Ultralytics' validator, given Ultralytics' arguments only (it re-checks them against its own keys)."""
        ultra_args, _ = split_kd_args(vars(self.args))
        return DetectionValidator(self.test_loader, save_dir=self.save_dir, args=ultra_args, _callbacks=self.callbacks)
