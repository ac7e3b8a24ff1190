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
