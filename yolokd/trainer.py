"""`DistillationTrainer`: Ultralytics' `DetectionTrainer` with a frozen teacher and distillation losses.

    from ultralytics import YOLO
    from yolokd import DistillationTrainer
    YOLO("yolov8n.yaml").train(trainer=DistillationTrainer, teacher="teacher.pt", method="dfd", data="synthetic")

What it changes, and where (everything else is the Ultralytics training loop, untouched):
- `__init__`: merges yolokd's arguments into the config and runs every check before Ultralytics creates the run
  folder; resolves `data=synthetic`.
- `check_resume`: Ultralytics' resume, with `teacher=` / `cls_teacher=` re-pointed (a teacher file that moved) and
  checked like a new run's.
- `setup_model`: loads and freezes the teacher, builds the distillation (`build_distillation`: the methods' adapters
  sized from a dry forward pass).
- `build_optimizer`: adds the adapters' parameters to Ultralytics' parameter groups (same lr schedule, decay rules).
- `_setup_train`: makes the adapters identical on every DDP rank, installs `DistillationLoss` as the student's
  criterion (after EMA creation, so the EMA and the checkpoints never see it).
- `optimizer_step`: averages the adapters' gradients across DDP ranks (DDP only wraps the student) and clips them
  like the student's (a norm of 10 of their own).
- `save_model`: writes the adapters to `weights/kd_state.pt` (atomically), beside the plain student checkpoint.
- `resume_training` / `_load_checkpoint_state`: restore the adapters of the same epoch from beside the checkpoint
  given, on resume and when Ultralytics' NaN recovery reloads last.pt.
- `get_validator`: hands the validator Ultralytics' arguments only.
- with `plots=True` (rank 0): `kd_explain_epoch<e>.png` at the end of the first, middle and last epoch (an
  `on_fit_epoch_end` callback) and `plot_metrics`'s `kd_results.png`, with the criterion's `kd_agree` column
  (yolokd/explain.py); with `plots=False` none of it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import distributed as dist

from ultralytics.cfg import DEFAULT_CFG, cfg2dict
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator
from ultralytics.utils import LOGGER, RANK, colorstr
from ultralytics.utils.torch_utils import unwrap_model

from yolokd.checks import DistillationConfigError, check_classes, check_strides, freeze, load_detector
from yolokd.config import check_kd_values, check_train_keys, check_train_values, full_defaults, split_kd_args
from yolokd.criterion import broadcast_from_rank0, build_distillation
from yolokd.data.checks import check_dataset, load_dataset
from yolokd.data.synthetic import resolve_data
from yolokd.explain import EpochFigures, plot_kd_results
from yolokd.methods.base import MethodSet, check_adapter_init, get_method, parse_methods
from yolokd.taps import strip_taps

DEFAULT_METHOD = "ld"  # the method that beat the plain student in docs/benchmarks.md
BUILTIN = "ultralytics"  # method name that hands distillation to Ultralytics' own `distill_model=`
KD_STATE = "kd_state.pt"  # adapters of the run, beside last.pt (named so Ultralytics' `last*.pt` search skips it)
REPOINTABLE = ("teacher", "cls_teacher")  # arguments a resumed run accepts anew (files that may have moved)


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
        check_train_values(overrides)
        if overrides.get("data"):
            overrides["data"] = resolve_data(overrides["data"])
        self.teacher = self.distillation = self._kd_state_dir = None
        self._preflight = None
        if not overrides.get("resume"):
            data = load_dataset(overrides["data"]) if overrides.get("data") else None
            if data is not None:  # what the dataset holds, before Ultralytics creates the run folder
                check_dataset(data, str(overrides["data"]))
            self._preflight = self._check_inputs(overrides, data)
        if overrides.get("method") == BUILTIN and not overrides.get("resume"):
            overrides["distill_model"] = overrides["teacher"]  # Ultralytics loads and wraps the teacher itself
        super().__init__(base, overrides, _callbacks)
        if self.args.resume and self.kd_method_names:  # the run's own arguments are back: check them as a new run's
            self._preflight = self._check_inputs(vars(self.args), load_dataset(self.args.data))
        if self.kd_method_names and self.args.compile:
            LOGGER.warning("compile=True is not supported with distillation (forward hooks); disabling it.")
            self.args.compile = False
        if self.kd_method_names and self.args.plots:
            self.add_callback("on_fit_epoch_end", EpochFigures())

    def check_resume(self, overrides):
        """Ultralytics' resume (it restores the run's arguments and ignores most new ones), except `teacher=` and
        `cls_teacher=`: a teacher file that moved can be re-pointed; `__init__` then checks it like a new run's."""
        repointed = {k: overrides[k] for k in REPOINTABLE if overrides.get(k)}
        super().check_resume({k: v for k, v in overrides.items() if k not in repointed})
        if self.args.resume:
            for key, value in repointed.items():
                setattr(self.args, key, value)

    @property
    def kd_method_names(self) -> list[str]:
        """yolokd methods of this run (from the arguments, so resumed runs get theirs back from the checkpoint)."""
        names = resolve_method_names(getattr(self.args, "method", None), getattr(self.args, "teacher", None))
        return [] if names == [BUILTIN] else names

    def _check_inputs(self, overrides: dict, data: dict | None) -> tuple | None:
        """Every check of the distillation's inputs (`data`: the checked dataset dict, or None), then what each method
        makes of them once all passed (`prepare_inputs`, e.g. DICOD's cls_teacher=auto), before Ultralytics creates
        the run folder. Returns (teacher, student) or None."""
        _, kd = split_kd_args(overrides)
        check_kd_values(kd)
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
        for n in names:
            get_method(n).check_inputs(overrides, data)
        teacher = None
        if teacher_spec:  # first: a teacher that is missing or wrong stops before the student is built (and logs)
            teacher = load_detector(teacher_spec, "teacher", nc=data and data["nc"])
            if str(teacher_spec).endswith((".yaml", ".yml")):
                LOGGER.warning(f"yolokd: teacher={teacher_spec} has random weights, so the student learns to imitate "
                               "noise; pass a trained teacher (teacher=path/to/best.pt) unless this is a smoke test.")
            elif data is not None:
                check_classes(teacher, data, teacher_spec)
        student_spec = overrides.get("model")
        student = load_detector(student_spec, "student", nc=data and data["nc"]) if student_spec else None
        if teacher is not None and student is not None:
            check_strides(student, teacher)
        for n in names:
            get_method(n).prepare_inputs(overrides, data)
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
        self.distillation.agreement = bool(self.args.plots)  # the kd_agree column, for kd_results.png
        n_adapt = sum(p.numel() for p in self.kd_methods.parameters() if p.requires_grad)
        LOGGER.info(
            f"{colorstr('yolokd:')} method={'+'.join(names)} teacher={self.args.teacher} "
            f"({n_adapt:,} adapter parameters, trained with the student and never saved in it)"
        )
        self._log_fades()
        self._log_own_grad_cap()
        return ckpt

    def _log_fades(self) -> None:
        """Say from which epoch each faded method's terms fall (`method_fade`); warn where that is the first epoch,
        which a run of very few epochs gets (with epochs=1 a faded method distils nothing)."""
        from yolokd.criterion import schedule_factor

        epochs = self.epochs
        for name, fade in self.kd_methods.fades.items():
            if fade <= 0 or get_method(name).task_scaled is True:
                continue
            start = next(e for e in range(epochs) if schedule_factor(e, epochs, 0.0, fade) < 1)  # the last is 0
            msg = (f"yolokd: {name}'s terms fade linearly to 0 from epoch {start + 1} of {epochs} (fade {fade}; "
                   f"kd_fade=0 keeps every method's weights constant)")
            if start == 0:
                LOGGER.warning(f"{msg}: with {epochs} epoch(s) they are lowered from the first.")
            else:
                LOGGER.info(msg)

    def _log_own_grad_cap(self) -> None:
        """Say when the gradient-share cap acts by the methods' own `<method>_grad_ratio` (`run_grad_ratio`), not by
        a `kd_grad_ratio` the user gave."""
        cap = self.distillation.grad_cap
        if cap is not None and getattr(self.args, "kd_grad_ratio", None) is None:
            LOGGER.info(f"yolokd: the gradient of {', '.join(self.kd_methods.capped_methods)}'s terms is capped at "
                        f"{cap.ratio} times the task's at each student tensor they read (their own grad_ratio; "
                        f"kd_grad_ratio=0 turns it off)")

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
        """Ultralytics' setup (with the resume), the adapters made identical on every DDP rank, then the distillation
        loss installed as the student's criterion (after the EMA copy is made, so the EMA and checkpoints never see
        it)."""
        super()._setup_train()
        if self.distillation is not None:
            self.sync_adapters()
            self.distillation.install(unwrap_model(self.model))

    # ---------------------------------------------------------------- DDP, step
    def sync_adapters(self) -> None:
        """Give every DDP rank rank 0's adapters. Ultralytics seeds each rank differently before `setup_model`, so
        each built its own random adapters; a resumed run's are loaded on every rank but broadcast all the same."""
        if self.world_size > 1 and dist.is_initialized():
            broadcast_from_rank0(self.kd_methods)

    def average_adapter_grads(self, params: list[torch.Tensor]) -> None:
        """Mean of the adapters' gradients over DDP ranks (DDP averages only the student's, which it wraps).

        SUM then divide, which every backend supports (gloo has no `ReduceOp.AVG`); a rank whose step produced no
        gradient for a parameter contributes zeros, so every rank makes the same collective calls."""
        if self.world_size <= 1 or not dist.is_initialized():
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world_size)

    def optimizer_step(self):
        """Ultralytics' step (8.4 `BaseTrainer.optimizer_step`: unscale, clip the gradient norm to 10, step, EMA
        update) with the adapters in it: their gradients averaged over DDP ranks first, and clipped like the
        student's, to a norm of 10 of their own. A norm of its own leaves the student's clip exactly as in plain
        training: one norm over both would let a large adapter gradient shrink the student's steps."""
        if self.kd_methods is None:
            return super().optimizer_step()
        adapters = [p for p in self.kd_methods.parameters() if p.requires_grad]
        self.average_adapter_grads(adapters)
        self.scaler.unscale_(self.optimizer)
        foreach = False if self.device.type == "npu" else None
        for params in (list(self.model.parameters()), adapters):
            torch.nn.utils.clip_grad_norm_(params, max_norm=10.0, foreach=foreach)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)

    # ---------------------------------------------------------------- save, resume, NaN recovery
    def save_model(self):
        """Plain student checkpoints (Ultralytics), plus the adapters in `weights/kd_state.pt` for resuming.

        kd_state.pt is written to a temporary file and renamed over the old one, so a kill mid-write leaves the
        previous file whole; it records the epoch, which a resume compares with last.pt's."""
        if self.ema is not None:
            strip_taps(self.ema.ema)  # an EMA re-copied from the tapped student (NaN recovery) must not carry hooks
        saved = super().save_model()
        if self.kd_methods is not None and RANK in {-1, 0}:
            path = self.wdir / KD_STATE
            tmp = path.with_name(f".{KD_STATE}.tmp")
            torch.save({"epoch": self.epoch, "method": "+".join(self.kd_method_names),
                        "adapters": self.kd_methods.state_dict()}, tmp)
            os.replace(tmp, path)
        return saved

    def resume_training(self, ckpt):
        """Ultralytics' resume; the adapters are read from beside the checkpoint the user passed (`resume=`), which
        may have moved since the run recorded its folder."""
        self._kd_state_dir = Path(self.args.resume).parent if self.resume and ckpt is not None else None
        try:
            super().resume_training(ckpt)
        finally:
            self._kd_state_dir = None

    def _load_checkpoint_state(self, ckpt):
        """Ultralytics' restore of optimizer, EMA, ... (on resume, and when its NaN recovery reloads last.pt), then
        the adapters of the same epoch; the EMA it rebuilds from the tapped student is stripped of yolokd hooks."""
        super()._load_checkpoint_state(ckpt)
        strip_taps(self.ema.ema)
        if self.kd_methods is not None:
            self._load_kd_state((self._kd_state_dir or self.wdir) / KD_STATE, ckpt.get("epoch"))

    def _load_kd_state(self, path: Path, epoch: int | None) -> None:
        """Adapters from `path`, which must be readable and of the checkpoint's `epoch`; a missing file warns and
        leaves the adapters freshly initialised."""
        if not path.exists():
            LOGGER.warning(f"{path} not found: resuming with freshly initialised adapters (the distillation "
                           "re-learns them; the student is restored).")
            return
        fix = (f"Delete or rename {path} to resume with freshly initialised adapters (the student is restored, the "
               "adapters are re-learnt), or resume from the last.pt it was written with.")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            adapters, saved_epoch = state["adapters"], state["epoch"]
        except Exception as e:  # truncated, damaged, not ours
            raise DistillationConfigError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}). "
                                          f"{fix}") from e
        if epoch is not None and saved_epoch != epoch:
            raise DistillationConfigError(f"{path} holds the adapters of epoch {saved_epoch + 1}, but the checkpoint "
                                          f"is of epoch {epoch + 1}. {fix}")
        self.kd_methods.load_state_dict(adapters)
        LOGGER.info(f"{colorstr('yolokd:')} restored adapters from {path} (epoch {saved_epoch + 1})")

    # ---------------------------------------------------------------- plots
    def plot_metrics(self):
        """Ultralytics' results.png and, for a distilled run, kd_results.png beside it (`plot_kd_results`)."""
        super().plot_metrics()
        if self.kd_method_names:
            plot_kd_results(self.csv, on_plot=self.on_plot)

    # ---------------------------------------------------------------- validation
    def get_validator(self):
        """Ultralytics' validator, given Ultralytics' arguments only (it re-checks them against its own keys)."""
        ultra_args, _ = split_kd_args(vars(self.args))
        return DetectionValidator(self.test_loader, save_dir=self.save_dir, args=ultra_args, _callbacks=self.callbacks)
