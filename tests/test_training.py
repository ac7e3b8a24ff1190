"""End-to-end distillation runs on the tiny synthetic set (a few seconds each on a 2-core CPU).

A yolov8s teacher is trained once for the session; students distil from it for one epoch.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import pickled_modules, read_results
from yolokd.cli import main
from yolokd.trainer import KD_STATE, DistillationTrainer

pytestmark = pytest.mark.slow


def train(model: str, name: str, kw: dict, **extra):
    from ultralytics import YOLO

    yolo = YOLO(model)
    yolo.train(trainer=DistillationTrainer, name=name, **{**kw, **extra})
    return yolo.trainer


@pytest.fixture(scope="session")
def teacher(tiny_data, train_kwargs) -> str:
    """A yolov8s teacher trained by yolokd itself (plain training: no teacher argument)."""
    t = train("yolov8s.yaml", "teacher", train_kwargs, data=tiny_data)
    assert t.kd_methods is None and not (t.wdir / KD_STATE).exists()
    return str(t.best)


def check_kd_columns(run_dir: Path, *terms: str):
    rows = read_results(run_dir)
    for col in ("train/kd_loss", *(f"train/{t}" for t in terms)):
        assert all(math.isfinite(r[col]) and r[col] > 0 for r in rows), (col, rows)
    assert all(r["val/kd_loss"] == 0 for r in rows)  # validation reports the KD column as zero


def test_dfd_v8_student_is_a_plain_ultralytics_checkpoint(teacher, tiny_data, train_kwargs):
    t = train("yolov8n.yaml", "dfd_v8", train_kwargs, data=tiny_data, teacher=teacher, method="dfd")
    check_kd_columns(t.save_dir, "dfd_hd", "dfd_ld")
    best = t.best
    assert pickled_modules(best) <= {"ultralytics", "torch", "collections", "builtins", "__builtin__", "numpy", "_codecs",
                                     "pathlib", "datetime"}, pickled_modules(best)
    assert (t.wdir / KD_STATE).exists()
    # Loads and predicts where yolokd cannot be imported, with Ultralytics' safe loading on.
    code = (
        "import sys; sys.modules['yolokd'] = None\n"
        "import numpy as np\nfrom ultralytics import YOLO\n"
        f"m = YOLO({str(best)!r})\n"
        "assert not any('yolokd' in type(x).__module__ for x in m.model.modules())\n"
        "assert all(not x._forward_hooks and not x._forward_pre_hooks for x in m.model.modules())\n"
        "r = m.predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, verbose=False)\n"
        "print('OK', len(r))\n"
    )
    env = {**os.environ, "ULTRALYTICS_SAFE_LOAD": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK 1" in out.stdout, out.stderr[-2000:]


def test_teacher_frozen_and_outside_the_student(teacher, tiny_data, train_kwargs):
    t = train("yolov8n.yaml", "fitnet", train_kwargs, data=tiny_data, teacher=teacher, method="fitnet",
              fitnet_projector="branch")
    check_kd_columns(t.save_dir)
    assert not any(p.requires_grad for p in t.teacher.parameters())
    assert not t.teacher.training
    student_params = {id(p) for p in t.model.parameters()}
    assert not student_params & {id(p) for p in t.teacher.parameters()}
    optimised = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in t.kd_methods.parameters()} <= optimised  # adapters are trained ...
    assert not optimised & {id(p) for p in t.teacher.parameters()}  # ... the teacher is not
    no_decay = {id(p) for g in t.optimizer.param_groups if g["param_group"] == "bn" for p in g["params"]}
    bn_weights = [m.weight for m in t.kd_methods.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn_weights and {id(p) for p in bn_weights} <= no_decay  # a branch projector's BN: no weight decay


def test_resume_restores_adapters_and_continues(teacher, tiny_data, train_kwargs):
    from ultralytics import YOLO

    class Stop(Exception):
        pass

    def stop_after_first_save(trainer):
        raise Stop

    kw = {**train_kwargs, "epochs": 2}
    yolo = YOLO("yolov8n.yaml")
    yolo.add_callback("on_model_save", stop_after_first_save)
    with pytest.raises(Stop):
        yolo.train(trainer=DistillationTrainer, name="resume", data=tiny_data, teacher=teacher, method="dfd", **kw)
    first = yolo.trainer
    saved = torch.load(first.wdir / KD_STATE, weights_only=True)["adapters"]

    restored = {}

    def capture(trainer):  # after setup: adapters as loaded, before any resumed step
        restored.update({k: v.detach().clone() for k, v in trainer.kd_methods.state_dict().items()})

    resumed = YOLO(str(first.last))
    resumed.add_callback("on_pretrain_routine_end", capture)
    resumed.train(trainer=DistillationTrainer, resume=True)
    assert resumed.trainer.args.method == "dfd" and resumed.trainer.args.teacher == teacher
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k].cpu(), restored[k].cpu()) for k in saved)
    assert len(read_results(first.save_dir)) == 2  # epoch 1 from the first run, epoch 2 from the resumed one


@pytest.mark.parametrize("student,method,columns", [
    ("yolo26n.yaml", "dfd+ld", ["dfd_hd", "dfd_ld", "ld_cls", "ld_box"]),  # reg_max = 1 head: ld's L1 box term
    ("yolo11n.yaml", "dfd", ["dfd_hd", "dfd_ld"]),
])
def test_other_families_from_v8_teacher(student, method, columns, teacher, tiny_data, train_kwargs):
    t = train(student, f"{method}_{student[:6]}", train_kwargs, data=tiny_data, teacher=teacher, method=method)
    check_kd_columns(t.save_dir, *columns)
    assert "ultralytics" in pickled_modules(t.best) and "yolokd" not in pickled_modules(t.best)


def test_plain_student_has_no_kd_columns(tiny_data, train_kwargs):
    t = train("yolov8n.yaml", "plain", train_kwargs, data=tiny_data)
    assert not any("kd" in k for k in read_results(t.save_dir)[0])


def test_ultralytics_builtin_runs_in_the_same_harness(teacher, tiny_data, train_kwargs):
    t = train("yolov8n.yaml", "builtin", train_kwargs, data=tiny_data, teacher=teacher, method="ultralytics")
    row = read_results(t.save_dir)[0]
    assert math.isfinite(row["train/dis_loss"]) and row["train/dis_loss"] > 0


def test_cli_train_synthetic(teacher, train_kwargs, capsys):
    code = main(["train", "model=yolov8n.yaml", f"teacher={teacher}", "method=fitnet", "data=synthetic-tiny",
                 "epochs=1", "imgsz=64", "batch=8", "plots=False", "workers=0",
                 f"project={train_kwargs['project']}", "name=cli", "exist_ok=True"])
    assert code == 0
    check_kd_columns(Path(train_kwargs["project"]) / "cli")


PGD_COLS, RM_COLS = ["pgd_cls", "pgd_reg", "pgd_att"], ["rm_cls", "rm_loc"]


@pytest.mark.parametrize("method,columns", [  # kd_scale: the cap's factor, logged when a term is capped (not ld's);
    ("pdf", ["kd_scale", "kd_gscale"]), ("pfi", ["kd_scale"]),  # kd_skip: share of dropped steps
    ("rm", [*RM_COLS, "kd_scale"]), ("rmpfi", ["rmpfi_cls", "rmpfi_loc", "rmpfi_pfi", "kd_scale"]),
    ("pgd", [*PGD_COLS, "kd_scale", "kd_gscale"]),  # kd_gscale: pdf's and pgd's own gradient-share cap (grad_ratio)
    ("dfd+pgd+rm", ["dfd_hd", "dfd_ld", *PGD_COLS, *RM_COLS, "kd_scale"]), ("ld", ["ld_cls", "ld_box"]),
    ("fitnet", ["fitnet_ht", "fitnet_kd", "kd_scale"]),
])
def test_every_method_trains_a_yolo11_student(method, columns, teacher, tiny_data, train_kwargs):
    t = train("yolo11n.yaml", f"y11_{method}", train_kwargs, data=tiny_data, teacher=teacher, method=method,
              kd_fade=0)  # one epoch: rmpfi's own fade would hold its terms at 0 throughout
    row = read_results(t.save_dir)[0]
    assert math.isfinite(row["train/kd_loss"]) and row["train/kd_loss"] > 0
    logged = sorted(k[len("train/"):] for k in row if k.startswith("train/") and k.split("/")[1] not in
                    {"box_loss", "cls_loss", "dfl_loss", "kd_loss"})
    assert logged == sorted([*columns, "kd_skip"]) and row["train/kd_skip"] == 0
    assert all(math.isfinite(row[f"train/{c}"]) for c in columns)
    assert all(len(c) <= 10 for c in columns)  # Ultralytics' progress bar prints 11-wide columns
    if "kd_scale" in columns:
        assert 0 < row["train/kd_scale"] <= 1


def test_kd_fade_and_adapter_init_reach_the_loss(teacher, tiny_data, train_kwargs):
    t = train("yolov8n.yaml", "fade", {**train_kwargs, "epochs": 2}, data=tiny_data, teacher=teacher,
              method="fitnet+ld", kd_fade=0.5, fitnet_projector="conv")
    first, last = read_results(t.save_dir)
    assert first["train/fitnet_ht"] > 0 and last["train/fitnet_ht"] == 0  # 2 epochs, fade 0.5: factors 1, 0
    for task_scaled in ("train/ld_cls", "train/fitnet_kd"):  # never faded
        assert first[task_scaled] > 0 and last[task_scaled] > 0

    fitted = train("yolov8n.yaml", "lstsq", train_kwargs, data=tiny_data, teacher=teacher, method="fitnet+ld",
                   adapter_init="lstsq", fitnet_projector="conv")  # least squares fits 1x1 projectors only
    assert read_results(fitted.save_dir)[0]["train/fitnet_ht"] < first["train/fitnet_ht"]  # same data, fitted map
    state = torch.load(fitted.wdir / KD_STATE, weights_only=True)["adapters"]
    assert bool(state["adapters_fitted"])  # fitted on the first batch, saved so that a resume does not refit


def test_kd_grad_ratio_logs_its_factor(teacher, tiny_data, train_kwargs):
    t = train("yolov8n.yaml", "gradcap", train_kwargs, data=tiny_data, teacher=teacher, method="dfd+ld",
              kd_grad_ratio=0.1)
    row = read_results(t.save_dir)[0]
    assert 0 < row["train/kd_gscale"] <= 1 and row["train/dfd_hd"] > 0 and row["train/ld_cls"] > 0
