"""Shared test helpers: checkpoints made without training, results.csv reading, a pickle scan."""

from __future__ import annotations

import csv
import pickletools
import zipfile
from pathlib import Path

import torch


def save_checkpoint(path: Path, cfg: str, names: dict[int, str]) -> Path:
    """An Ultralytics-format checkpoint of a randomly initialised model (what load_checkpoint reads)."""
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel

    cls = ClassificationModel if "-cls" in cfg else DetectionModel
    model = cls(cfg, nc=len(names), verbose=False)
    model.names = dict(names)
    torch.save({"model": model.half(), "train_args": {}}, path)
    return path


def read_results(run_dir: Path) -> list[dict[str, float]]:
    """Rows of results.csv as dicts of floats (column names stripped)."""
    with open(Path(run_dir) / "results.csv") as f:
        return [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def pickled_modules(pt: Path) -> set[str]:
    """Top-level package of every class or function a torch checkpoint's pickle references."""
    with zipfile.ZipFile(pt) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in {"SHORT_BINUNICODE", "BINUNICODE", "UNICODE"}:
            strings.append(arg)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(strings[-2].split(".")[0])
        elif op.name == "GLOBAL":
            found.add(arg.split()[0].split(".")[0])
    return found


def student_step(cfg: str, names: list[str], args, teacher_cfg: str | None = None):
    """One training-mode step of a random student through the trainer's distillation (`build_distillation`), and
    what it saw, for the checks.

    Returns:
        methods, student features, teacher features, StepContext, student model, loss vector, loss items, the loss.
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from yolokd.criterion import build_distillation
    from yolokd.methods.base import StepContext
    from yolokd.taps import raw_forward

    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=len(names), verbose=False)
    model.args = get_cfg()
    teacher = DetectionModel(teacher_cfg, nc=len(names), verbose=False).eval() if teacher_cfg else None
    crit = build_distillation(args.method.split("+"), model, teacher, args).install(model)
    torch.manual_seed(1)  # the same image whatever the methods' adapters drew from the generator
    img = torch.rand(2, 3, 64, 64)
    batch = {"img": img, "batch_idx": torch.tensor([0.0, 0.0, 1.0]), "cls": torch.tensor([[0.0], [2.0], [1.0]]),
             "bboxes": torch.tensor([[0.3, 0.3, 0.4, 0.3], [0.7, 0.6, 0.3, 0.5], [0.5, 0.5, 0.6, 0.6]])}
    model.train()
    preds = model(img)
    loss, items = crit(preds, batch)
    s = crit.student_taps.collect(preds)  # the same tensors again, for method-only gradients
    with torch.no_grad():
        t = crit.teacher_taps.collect(raw_forward(teacher, img)) if teacher else None
    ctx = StepContext(batch=batch, assign=crit.assignment.last)
    return crit.methods, s, t, ctx, model, loss, items, crit
