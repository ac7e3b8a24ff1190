"""Load a user's checkpoint for export without running code it carries, and refuse one that is not a plain student.

A .pt file is a pickle: unpickling it can call any function it names (`builtins.exec`, `os.system`, ...), and even
calling an allowed class runs that class's constructor on data the file chooses (Ultralytics' `DetectionModel(cfg)`
evaluates `cfg["activation"]` with `eval`). `load_student` therefore unpickles the file exactly once, with
`CheckpointUnpickler`, which

- resolves only the globals a real Ultralytics detection checkpoint holds (`allowed_global`): the `nn.Module` classes
  of `torch.nn.modules.*` and `ultralytics.nn.modules.*`, `ultralytics.nn.tasks.DetectionModel`, torch's tensor
  rebuild functions, `torch.Size` / `torch.device` / dtypes, `collections.OrderedDict`, `set` / `frozenset` /
  `slice`, Ultralytics' argument namespace `IterableSimpleNamespace`, and numpy scalars / dtypes;
- calls (pickle REDUCE) only the rebuild functions and plain data types among them (`RECONSTRUCTORS`): a module class
  is created with `cls.__new__` and filled from its saved state (NEWOBJ + BUILD), never constructed;
- appends, sets items and builds state only on lists, dicts, sets, modules, tensors and namespaces.

Anything else stops the load with a one-line `DistillationConfigError` naming the global and why, before it runs.
The loaded checkpoint is then refused when it holds no detection model, a teacher or distillation wrapper, adapters,
or hooks left by distillation (`check_clean_student`). See docs/export.md for what this does and does not guarantee.
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import collections
import importlib
import pickle
import zipfile
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from yolokd.config import DistillationConfigError

# Attribute-name fragments that betray distillation state inside a model (teacher, adapters, wrappers).
DISTILL_ATTRS = ("teacher", "student_model", "distill", "adapter", "kd_")
# Packages whose nn.Module subclasses a checkpoint may hold (created with __new__, filled from their saved state).
MODULE_PACKAGES = ("torch.nn.modules.", "ultralytics.nn.modules.")
# Ultralytics' task models: the detector is exported, every other task is refused by name.
TASK_MODELS = "ultralytics.nn.tasks"
DETECTION_MODEL = "ultralytics.nn.tasks.DetectionModel"
# The fix every refused pickle ends with.
NOT_CLEAN = (
    "not a clean student checkpoint; export the weights/best.pt written by a training run (DistillationTrainer "
    "saves the student only)"
)


class RefusedPickle(pickle.UnpicklingError):
    """The checkpoint's pickle asks for something a plain detection checkpoint never needs."""


def _reconstructors() -> dict[str, Any]:
    """Globals a checkpoint may call while unpickling, by pickled name: rebuild functions and plain data types."""
    from ultralytics.utils import IterableSimpleNamespace

    scalar = np.float64(0).__reduce__()[0]  # numpy.core.multiarray.scalar (numpy 1) / numpy._core... (numpy 2)
    found = {
        "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.slice": slice,
        "_codecs.encode": _codecs.encode,  # how pickle protocol 2 writes bytes (numpy scalars)
        "ultralytics.utils.IterableSimpleNamespace": IterableSimpleNamespace,
        "numpy.dtype": np.dtype,
    }
    found.update({f"{m}.multiarray.scalar": scalar for m in ("numpy.core", "numpy._core")})
    return found


RECONSTRUCTORS = _reconstructors()
# What BUILD (set an object's saved state) and NEWOBJ (`cls.__new__(cls)`) may act on.
BUILDABLE = (nn.Module, torch.Tensor, np.dtype, SimpleNamespace, collections.OrderedDict)


def allowed_global(module: str, name: str) -> Any:
    """The object a checkpoint's pickle may reference as `module.name`, or `RefusedPickle` saying why not."""
    full = f"{module}.{name}"
    if full in RECONSTRUCTORS:
        return RECONSTRUCTORS[full]
    if module == "torch" and not name.startswith("_") and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)  # torch.float16 etc.: values, not callables
    parts_ok = all(p.isidentifier() for p in (*module.split("."), name))
    if parts_ok and (module.startswith(MODULE_PACKAGES) or full == DETECTION_MODEL):
        try:
            obj = getattr(importlib.import_module(module), name, None)
        except ImportError:
            obj = None
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module:
            return obj
    if module == TASK_MODELS and name.endswith("Model"):
        raise RefusedPickle(
            f"holds an Ultralytics {name}, not a DetectionModel: yolokd exports and benchmarks detectors (YOLOv8 / "
            f"11 / 26 detect, not -cls / -seg / -pose / -obb); pass a detection checkpoint"
        )
    why = (
        "a yolokd class (a distillation hook, adapter or loss saved with the model, which users without yolokd "
        "could not load)" if module.split(".")[0] == "yolokd"
        else "outside what a plain Ultralytics detection checkpoint holds (Ultralytics and torch.nn modules, tensors, "
        "OrderedDict, set, numpy scalars), so loading it could run code the file carries"
    )
    raise RefusedPickle(f"references {full}, {why}: {NOT_CLEAN}")


class CheckpointUnpickler(pickle._Unpickler):
    """Python's own unpickler with every opcode that can run code limited to `allowed_global` (module docstring).

    Pure-Python `pickle._Unpickler`, because its opcode table can be narrowed; a checkpoint's pickle is small
    (the tensors are separate records), so the slower unpickler costs well under a second.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # protocol 2 spells `builtins` as `__builtin__`, as pickle maps it
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        return allowed_global(module, name)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is f for f in RECONSTRUCTORS.values()):
            raise RefusedPickle(
                f"calls {getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)} on data of its own "
                f"choosing (a checkpoint restores modules from their saved state, never constructs them), so that "
                f"code would run: {NOT_CLEAN}"
            )
        self.stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    def load_newobj_ex(self) -> None:
        kwargs, args, cls = self.stack.pop(), self.stack.pop(), self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    @staticmethod
    def _new(cls: Any, args: tuple, kwargs: dict | None = None) -> Any:
        if not (isinstance(cls, type) and issubclass(cls, BUILDABLE)):
            raise RefusedPickle(f"creates an object of {cls!r}, which a detection checkpoint never holds: {NOT_CLEAN}")
        return cls.__new__(cls, *args, **(kwargs or {}))

    def load_build(self) -> None:
        if not isinstance(self.stack[-2], BUILDABLE):
            raise RefusedPickle(
                f"sets the state of a {type(self.stack[-2]).__name__}, which a checkpoint never does: {NOT_CLEAN}"
            )
        super().load_build()

    def _refuse_instantiate(self) -> None:
        raise RefusedPickle(
            f"instantiates a class with the INST/OBJ opcodes, which torch.save never writes: {NOT_CLEAN}"
        )

    @staticmethod
    def _check_target(target: Any, kind: type) -> None:
        if not isinstance(target, kind):
            raise RefusedPickle(f"adds items to a {type(target).__name__}, not a {kind.__name__}: {NOT_CLEAN}")

    def load_append(self) -> None:
        self._check_target(self.stack[-2], list)
        super().load_append()

    def load_appends(self) -> None:  # the target is the object below the MARK
        self._check_target(self.metastack[-1][-1], list)
        super().load_appends()

    def load_setitem(self) -> None:
        self._check_target(self.stack[-3], dict)
        super().load_setitem()

    def load_setitems(self) -> None:
        self._check_target(self.metastack[-1][-1], dict)
        super().load_setitems()

    def load_additems(self) -> None:
        self._check_target(self.metastack[-1][-1], set)
        super().load_additems()

    for _op, _fn in (
        (pickle.REDUCE, load_reduce), (pickle.NEWOBJ, load_newobj), (pickle.NEWOBJ_EX, load_newobj_ex),
        (pickle.BUILD, load_build), (pickle.INST, _refuse_instantiate), (pickle.OBJ, _refuse_instantiate),
        (pickle.APPEND, load_append), (pickle.APPENDS, load_appends), (pickle.SETITEM, load_setitem),
        (pickle.SETITEMS, load_setitems), (pickle.ADDITEMS, load_additems),
    ):
        dispatch[_op[0]] = _fn
    del _op, _fn


# What torch.load takes as `pickle_module`: a module whose Unpickler is ours (zip checkpoints use nothing else of it).
CHECKPOINT_PICKLE = ModuleType("yolokd_checkpoint_pickle")
CHECKPOINT_PICKLE.Unpickler = CheckpointUnpickler


def load_student(path: str | Path) -> dict[str, Any]:
    """Unpickle checkpoint `path` once with `CheckpointUnpickler` and check it is a clean detection student.

    Returns:
        The checkpoint dict (`model` / `ema`, `train_args`, ...): `model` is a plain model, no code was run.

    Raises:
        DistillationConfigError: one line naming the problem and the fix (not a torch zip checkpoint, a TorchScript
            archive, a refused global or call, no model, not a detector, distillation leftovers).
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            records = z.namelist()
    except zipfile.BadZipFile:
        raise DistillationConfigError(
            f"'{path}' is not a torch zip checkpoint (legacy torch<1.6 format, damaged, or not a .pt file): re-save "
            f"it with a recent torch, or pass the best.pt/last.pt of a training run."
        ) from None
    if any(n.endswith("/constants.pkl") for n in records):
        raise DistillationConfigError(
            f"'{path}' is a TorchScript archive, not an Ultralytics checkpoint: pass the .pt of a training run."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=CHECKPOINT_PICKLE)
    except RefusedPickle as e:
        raise DistillationConfigError(f"'{path}' was not loaded: its pickle {e}.") from None
    except Exception as e:  # truncated zip, damaged pickle, records that do not fit together
        first = (str(e).strip().splitlines() or [""])[0]
        raise DistillationConfigError(
            f"'{path}' could not be read as a checkpoint ({type(e).__name__}: {first}): re-save or re-train it."
        ) from None
    check_clean_student(ckpt, path)
    return ckpt


def load_yolo(path: str | Path):
    """Ultralytics' `YOLO(path)` for a student checkpoint, with the file unpickled once, by `load_student`.

    Ultralytics' own loading steps run (`load_checkpoint`: FP32 model in eval mode, its args, `pt_path`, ...), with
    its unpickling step `torch_safe_load` handed the checkpoint `load_student` returned, so the `YOLO` exports,
    predicts and validates the very object that was checked and the file is never unpickled without restriction.
    """
    from unittest import mock

    import ultralytics.nn.tasks as tasks
    from ultralytics import YOLO

    ckpt = load_student(path)
    with mock.patch.object(tasks, "torch_safe_load", lambda weight, *args, **kwargs: (ckpt, str(path))):
        yolo = YOLO(str(path), task="detect")
    if yolo.ckpt is not ckpt:  # an Ultralytics release that loads checkpoints another way: fail, do not re-read
        raise RuntimeError("Ultralytics no longer loads checkpoints through ultralytics.nn.tasks.torch_safe_load; "
                           "update yolokd.export.safety.load_yolo")
    return yolo


def check_clean_student(ckpt: Any, path: str | Path) -> None:
    """Refuse a loaded checkpoint without a detection model, or with a teacher, wrapper, adapter or hooks inside."""
    from yolokd.checks import check_detector

    models = {k: ckpt.get(k) for k in ("model", "ema")} if isinstance(ckpt, dict) else {}
    models = {k: m for k, m in models.items() if m is not None}
    if not models or not all(isinstance(m, nn.Module) for m in models.values()):
        raise DistillationConfigError(f"'{path}' holds no model under 'model'/'ema': not an Ultralytics checkpoint.")
    for key, model in models.items():
        problems = distillation_leftovers(model)
        if problems:
            raise DistillationConfigError(
                f"'{path}' is not a clean student checkpoint: ckpt['{key}'] has {'; '.join(problems[:4])}. Export "
                f"the plain student (weights/best.pt of a DistillationTrainer run); a model saved by Ultralytics' "
                f"own distillation (distill_model=) must be unwrapped to its student first."
            )
        check_detector(model, "model", path)


def distillation_leftovers(model: nn.Module) -> list[str]:
    """Teacher/adapter/wrapper attributes and non-empty hook dicts anywhere in `model`."""
    found = []
    if "distill" in type(model).__name__.lower():
        found.append(f"a distillation wrapper class {type(model).__qualname__}")
    for mod_name, m in model.named_modules():
        where = mod_name or "<root>"
        for attr, value in vars(m).items():
            if value is not None and any(s in attr.lower() for s in DISTILL_ATTRS):
                found.append(f"attribute '{attr}' on {where}")
        for attr, value in m._modules.items():
            if value is not None and any(s in attr.lower() for s in DISTILL_ATTRS):
                found.append(f"submodule '{attr}' on {where}")
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks = getattr(m, kind, None)
            if hooks:
                found.append(f"{len(hooks)} {kind.strip('_').replace('_', ' ')} on {where}")
    return found
