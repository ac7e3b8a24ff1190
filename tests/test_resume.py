"""Resume edge cases: the adapters come from beside the checkpoint given, of the same epoch, written atomically; a
damaged file is explained; a teacher that moved can be re-pointed; kill -9 in mid-epoch resumes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import read_results
from yolokd.cli import main
from yolokd.config import DistillationConfigError
from yolokd.trainer import KD_STATE, DistillationTrainer

pytestmark = pytest.mark.slow


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def teacher(tiny_data, train_kwargs, tmp_path_factory) -> Path:
    from ultralytics import YOLO

    yolo = YOLO("yolov8n.yaml")
    yolo.train(trainer=DistillationTrainer, name="resume_teacher", data=tiny_data, **train_kwargs)
    return Path(yolo.trainer.best)


@pytest.fixture(scope="module")
def stopped_run(teacher, tiny_data, train_kwargs) -> Path:
    """A 2-epoch dfd run stopped right after its first save: weights/last.pt + kd_state.pt of epoch 1."""
    from ultralytics import YOLO

    def stop(trainer):
        raise Stop

    yolo = YOLO("yolov8n.yaml")
    yolo.add_callback("on_model_save", stop)
    with pytest.raises(Stop):
        yolo.train(trainer=DistillationTrainer, name="stopped", data=tiny_data, teacher=str(teacher), method="dfd",
                   **{**train_kwargs, "epochs": 2})
    return Path(yolo.trainer.save_dir)


def copy_run(stopped_run: Path, where: Path) -> Path:
    shutil.copytree(stopped_run, where)
    return where


def resume(last: Path, **extra):
    """Resume from `last`; returns the trainer and the adapters as loaded (before any resumed step)."""
    from ultralytics import YOLO

    restored = {}

    def capture(trainer):
        restored.update({k: v.detach().clone() for k, v in trainer.kd_methods.state_dict().items()})

    yolo = YOLO(str(last))
    yolo.add_callback("on_pretrain_routine_end", capture)
    yolo.train(trainer=DistillationTrainer, resume=True, **extra)
    return yolo.trainer, restored


def saved_adapters(run: Path) -> dict:
    return torch.load(run / "weights" / KD_STATE, weights_only=True)["adapters"]


def test_adapters_come_from_beside_the_checkpoint_given_when_the_run_moved(stopped_run, tmp_path):
    moved = copy_run(stopped_run, tmp_path / "elsewhere")
    original = saved_adapters(stopped_run)
    os.remove(stopped_run / "weights" / KD_STATE)  # the folder the run recorded has no adapters any more
    try:
        trainer, restored = resume(moved / "weights" / "last.pt", save_dir=str(moved))
        assert original.keys() == restored.keys()
        assert all(torch.equal(original[k].cpu(), restored[k].cpu()) for k in original)
        assert len(read_results(moved)) == 2
    finally:
        torch.save({"epoch": 0, "method": "dfd", "adapters": original}, stopped_run / "weights" / KD_STATE)


def test_adapters_of_another_epoch_are_refused_with_the_fix(stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run, tmp_path / "run")
    state = torch.load(run / "weights" / KD_STATE, weights_only=True)
    torch.save({**state, "epoch": state["epoch"] + 3}, run / "weights" / KD_STATE)
    with pytest.raises(DistillationConfigError, match="holds the adapters of epoch 4, but the checkpoint is of epoch 1"):
        resume(run / "weights" / "last.pt", save_dir=str(run))
    assert main(["train", "resume=True", f"model={run / 'weights' / 'last.pt'}", f"save_dir={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Delete or rename" in err


def test_a_damaged_adapter_file_is_explained_in_one_line(stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run, tmp_path / "run")
    path = run / "weights" / KD_STATE
    path.write_bytes(path.read_bytes()[:200])  # truncated, as by a full disk
    assert main(["train", "resume=True", f"model={run / 'weights' / 'last.pt'}", f"save_dir={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path} cannot be read" in err and "freshly initialised" in err


def test_the_adapter_file_is_replaced_atomically(stopped_run, tmp_path, monkeypatch):
    # A save that dies half-way through writing (kill, full disk) leaves the previous kd_state.pt whole.
    from ultralytics import YOLO

    run = copy_run(stopped_run, tmp_path / "run")
    before = saved_adapters(run)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if isinstance(obj, dict) and "adapters" in obj:
            Path(f).write_bytes(b"half a file")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        yolo = YOLO(str(run / "weights" / "last.pt"))
        yolo.train(trainer=DistillationTrainer, resume=True, save_dir=str(run))
    monkeypatch.setattr(torch, "save", real_save)
    after = saved_adapters(run)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_teacher_that_moved_can_be_re_pointed(stopped_run, teacher, tmp_path, capsys):
    run = copy_run(stopped_run, tmp_path / "run")
    new_home = tmp_path / "teachers" / "t.pt"
    new_home.parent.mkdir()
    shutil.copy(teacher, new_home)
    trainer, _ = resume(run / "weights" / "last.pt", save_dir=str(run), teacher=str(new_home))
    assert trainer.args.teacher == str(new_home) and len(read_results(run)) == 2
    # a re-pointed teacher is checked like a new run's: the wrong classes are refused in one line
    from helpers import save_checkpoint

    wrong = save_checkpoint(tmp_path / "wrong.pt", "yolov8n.yaml", {0: "a", 1: "b"})
    run2 = copy_run(stopped_run, tmp_path / "run2")
    assert main(["train", "resume=True", f"model={run2 / 'weights' / 'last.pt'}", f"save_dir={run2}",
                 f"teacher={wrong}"]) == 2
    assert "predicts 2 classes but the dataset has 6" in capsys.readouterr().err


def test_kill_9_in_mid_epoch_then_resume(teacher, tiny_data, tmp_path):
    project, name = tmp_path / "runs", "killed"
    train_args = [f"data={tiny_data}", f"teacher={teacher}", "method=dfd", "epochs=3", "imgsz=64", "batch=8",
                  "workers=0", "plots=False", f"project={project}", f"name={name}", "exist_ok=True"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "yolokd", "train", "model=yolov8n.yaml", *train_args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kd_state = project / name / "weights" / KD_STATE  # written last by the end of epoch 1
    deadline = time.time() + 300
    while time.time() < deadline and not kd_state.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    time.sleep(0.3)  # into epoch 2 (an epoch of the tiny set takes seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_results(project / name)) == 1 and (project / name / "weights" / KD_STATE).exists()
    assert main(["train", "resume=True", f"model={project / name / 'weights' / 'last.pt'}"]) == 0
    rows = read_results(project / name)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and all(r["train/kd_loss"] > 0 for r in rows)
