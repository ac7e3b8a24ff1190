"""Checks that run before any training starts: each bad input fails with the problem and the fix.

Nothing here writes to disk, so a refused run leaves every existing run folder as it was.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ultralytics.nn.modules.head import Detect
from ultralytics.nn.tasks import (
    ClassificationModel,
    DetectionModel,
    OBBModel,
    PoseModel,
    SegmentationModel,
    guess_model_task,
    load_checkpoint,
    yaml_model_load,
)

from yolokd.config import DistillationConfigError


def resolve_weights(spec: str | Path, role: str) -> Path:
    """A local checkpoint path for `spec` (a path, or a name like 'yolov8s' resolved the Ultralytics way).

    Ultralytics downloads official weights by name; offline that fails with a network error. This tries the same
    resolution (local file, then Ultralytics' weights folder / download) and turns a failure into a clear message
    naming the argument: `teacher=`, `cls_teacher=`, or `model=` for the student.
    """
    key = "model" if role == "student" else role
    path = Path(str(spec))
    if not path.suffix:
        path = path.with_suffix(".pt")  # 'yolov8s' -> 'yolov8s.pt', as Ultralytics does for model names
    if path.exists():
        return path
    from ultralytics.utils import LOGGER, SETTINGS
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES, attempt_download_asset

    if (Path(SETTINGS["weights_dir"]) / path).exists():  # where Ultralytics keeps the weights it fetched
        return Path(SETTINGS["weights_dir"]) / path
    if path.name in GITHUB_ASSETS_NAMES:  # only official names can be fetched; the failure is reported below
        level = LOGGER.level
        LOGGER.setLevel("ERROR")  # Ultralytics' offline warnings would bury the one-line error
        try:
            found = Path(attempt_download_asset(path))
            if found.exists():
                return found
        except Exception:  # offline, no release, ...
            pass
        finally:
            LOGGER.setLevel(level)
    fix = (f"or a model .yaml (e.g. {key}={path.stem}.yaml) to start from random weights" if role == "student" else
           f"e.g. the best.pt of `yolo detect train model={path.stem}.yaml data=<your data>`; a .yaml {role} would "
           "teach from random weights")
    raise DistillationConfigError(
        f"{key}={spec}: {role} weights not found locally and not downloadable (offline, or not an official "
        f"Ultralytics asset). Pass a local path ({key}=path/to/{path.name}), {fix}."
    )


def load_detector(spec: str | Path, role: str, nc: int | None = None) -> DetectionModel:
    """Load a detector for `role` ('teacher' or 'student'): a checkpoint, or a .yaml built with random weights."""
    if str(spec).endswith((".yaml", ".yml")):
        try:
            cfg = yaml_model_load(str(spec))  # guessed from the file's head, without Ultralytics' warning for a name
        except Exception as e:
            raise DistillationConfigError(f"{role} model '{spec}' could not be built: {e}") from e
        task = guess_model_task(cfg)
        if task != "detect":
            raise DistillationConfigError(_not_a_detector(role, spec, task))
        try:
            return DetectionModel(cfg, nc=nc, verbose=False)
        except Exception as e:
            raise DistillationConfigError(f"{role} model '{spec}' could not be built: {e}") from e
    path = resolve_weights(spec, role)
    try:
        model, _ = load_checkpoint(path)
    except Exception as e:
        raise DistillationConfigError(
            f"{role} checkpoint '{path}' is corrupt or not an Ultralytics checkpoint ({type(e).__name__}: {e}). "
            f"Re-train or re-download it, or pass another file."
        ) from e
    check_detector(model, role, path)
    return model


def _not_a_detector(role: str, spec, task: str) -> str:
    return (
        f"{role} '{spec}' is a '{task}' model, but yolokd distils object detectors. Pass a detection model "
        f"(e.g. yolov8s.pt or yolo11n.yaml; not -cls/-seg/-pose/-obb)."
        + (" A classifier teacher is used by method=dicod through cls_teacher=." if task == "classify" else "")
    )


def model_task(model: nn.Module) -> str:
    """The task of a loaded model, from its class first (a checkpoint's saved `task` argument can be stale)."""
    kinds = ((SegmentationModel, "segment"), (PoseModel, "pose"), (OBBModel, "obb"), (ClassificationModel, "classify"))
    for cls, task in kinds:
        if isinstance(model, cls):
            return task
    return "detect" if isinstance(model, DetectionModel) else guess_model_task(model)


def check_detector(model: nn.Module, role: str, spec) -> None:
    """`model` must be a plain detection model whose head is a `Detect` (v8, 11 or 26), not a subclass of it."""
    task = model_task(model)
    head = getattr(model, "model", [None])[-1] if isinstance(model, DetectionModel) else None
    if task != "detect" or type(head) is not Detect:
        raise DistillationConfigError(_not_a_detector(role, spec, task))


def _names(model_or_data) -> list[str]:
    names = model_or_data["names"] if isinstance(model_or_data, dict) else model_or_data.names
    return [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)


def check_classes(teacher: nn.Module, data: dict, teacher_spec) -> None:
    """The teacher must predict exactly the dataset's classes, in the same order."""
    t_names, d_names = _names(teacher), _names(data)
    if len(t_names) != len(d_names):
        raise DistillationConfigError(
            f"teacher '{teacher_spec}' predicts {len(t_names)} classes but the dataset has {len(d_names)}. "
            f"Train the teacher on this dataset first (yolokd train model=<teacher> data=<same data>)."
        )
    if t_names != d_names:
        diff = [f"{i}: teacher '{a}' vs data '{b}'" for i, (a, b) in enumerate(zip(t_names, d_names)) if a != b]
        raise DistillationConfigError(
            f"teacher '{teacher_spec}' and the dataset name their classes differently ({'; '.join(diff[:5])}). "
            f"Class i of the teacher must be class i of the data: retrain the teacher on this dataset or fix the "
            f"dataset's 'names'."
        )


def check_strides(student: nn.Module, teacher: nn.Module) -> None:
    """Student and teacher must predict on the same pyramid levels (same strides, hence the same anchors)."""
    s, t = student.stride.tolist(), teacher.stride.tolist()
    if s != t:
        raise DistillationConfigError(
            f"student strides {s} differ from teacher strides {t}; distillation compares the two models level by "
            f"level. Pick a teacher and student of the same head layout (e.g. both P3-P5, not a -p2/-p6 variant)."
        )


def freeze(model: nn.Module) -> nn.Module:
    """Teacher mode: eval (BatchNorm running statistics), no parameter requires grad."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def dry_forward(model: nn.Module, imgsz: int):
    """One eval-mode forward of a (1, 3, imgsz, imgsz) zero image; restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        return model(torch.zeros(1, 3, imgsz, imgsz, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
