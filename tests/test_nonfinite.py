"""Non-finite distillation terms never reach the weights; Ultralytics' NaN recovery restores the adapters too."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import read_results
from yolokd.methods.dfd import DFD
from yolokd.trainer import KD_STATE, DistillationTrainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher(tiny_data, train_kwargs) -> str:
    from ultralytics import YOLO

    yolo = YOLO("yolov8n.yaml")
    yolo.train(trainer=DistillationTrainer, name="nonfinite_teacher", data=tiny_data, **train_kwargs)
    return str(yolo.trainer.best)


def test_inf_and_nan_terms_are_dropped_and_training_ends_with_sound_weights(teacher, tiny_data, train_kwargs,
                                                                             monkeypatch):
    from ultralytics import YOLO
    from ultralytics.utils import LOGGER

    real, calls, warnings = DFD.forward, [0], []

    def poisoned(self, s, t, ctx):  # step 2: the hd term is inf; step 4: NaN (e.g. dfd_alpha=1e40, a 0/0)
        out = real(self, s, t, ctx)
        calls[0] += 1
        if calls[0] in (2, 4):
            out["hd"] = out["hd"] * (math.inf if calls[0] == 2 else math.nan)
        return out

    monkeypatch.setattr(DFD, "forward", poisoned)
    monkeypatch.setattr(LOGGER, "warning", lambda msg, *a, **k: warnings.append(str(msg)))
    yolo = YOLO("yolov8n.yaml")
    yolo.train(trainer=DistillationTrainer, name="poisoned", data=tiny_data, teacher=teacher, method="dfd",
               **{**train_kwargs, "epochs": 2})
    rows = read_results(yolo.trainer.save_dir)
    per_epoch = math.ceil(48 / train_kwargs["batch"])  # the tiny set's 48 train images
    assert rows[0]["train/kd_skip"] == pytest.approx(2 / per_epoch, abs=1e-4) and rows[1]["train/kd_skip"] == 0
    assert all(math.isfinite(r["train/kd_loss"]) and math.isfinite(r["train/box_loss"]) for r in rows)
    assert sum("dfd_hd not finite" in w for w in warnings) == 1  # warned once, naming the term
    ckpt = torch.load(yolo.trainer.best, weights_only=False)
    convs = [m.weight for m in ckpt["model"].modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(torch.isfinite(w).all() for w in convs)
    assert all(w.abs().sum() > 0 for w in convs)  # Ultralytics' save turns NaN weights into zeros, silently
    adapters = torch.load(yolo.trainer.wdir / KD_STATE, weights_only=True)["adapters"]
    assert all(torch.isfinite(v).all() for v in adapters.values())


def test_nan_recovery_restores_the_adapters_with_the_student(teacher, tiny_data, train_kwargs, monkeypatch):
    # At the last step of epoch 2 the task loss turns NaN and the adapters are poisoned: Ultralytics' NaN recovery
    # reloads last.pt (epoch 1) into the student; the adapters must come back from kd_state.pt of epoch 1 too.
    from ultralytics import YOLO
    from ultralytics.utils.loss import v8DetectionLoss

    per_epoch = math.ceil(48 / train_kwargs["batch"])
    real, calls, loads = v8DetectionLoss.__call__, [0], []

    def nan_at_end_of_epoch_2(self, preds, batch):
        loss, items = real(self, preds, batch)
        calls[0] += torch.is_grad_enabled()  # training steps only, not validation
        if calls[0] == 2 * per_epoch and torch.is_grad_enabled():
            trainer = yolo.trainer
            with torch.no_grad():
                for p in trainer.kd_methods.parameters():
                    p.fill_(math.nan)
            loss = loss * math.nan
        return loss, items

    real_load = DistillationTrainer._load_kd_state

    def spy(self, path, epoch):
        loads.append(epoch)
        return real_load(self, path, epoch)

    monkeypatch.setattr(v8DetectionLoss, "__call__", nan_at_end_of_epoch_2)
    monkeypatch.setattr(DistillationTrainer, "_load_kd_state", spy)
    yolo = YOLO("yolov8n.yaml")
    yolo.train(trainer=DistillationTrainer, name="recovered", data=tiny_data, teacher=teacher, method="dfd",
               **{**train_kwargs, "epochs": 3})
    assert loads == [0]  # the recovery reloaded the adapters of epoch 1, beside last.pt
    assert all(torch.isfinite(p).all() for p in yolo.trainer.kd_methods.parameters())
    assert len(read_results(yolo.trainer.save_dir)) == 3
