"""`yolokd export` and `yolokd latency` (earlier name `benchmark`): help, and bad input refused with one line before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import ultralytics  # noqa: F401  (imported outside capsys, so its log handler keeps a stream that stays open)

from helpers import save_checkpoint
from yolokd.cli import main


@pytest.mark.parametrize("command,usage", [("export", "yolokd export model=<student.pt>"),
                                           ("benchmark", "yolokd latency models=a.pt,b.pt"),
                                           ("latency", "yolokd latency models=a.pt,b.pt")])
@pytest.mark.parametrize("word", ["help", "--help", "-h"])
def test_help(capsys, command, usage, word):
    assert main([command, word]) == 0
    out = capsys.readouterr().out
    assert usage in out and ("parity_conf=0.25" if command == "export" else "runtimes=auto") in out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_ckpts")
    return {"det": save_checkpoint(root / "det.pt", "yolov8n.yaml", {0: "a", 1: "b"}),
            "cls": save_checkpoint(root / "cls.pt", "yolov8n-cls.yaml", {0: "a", 1: "b"})}


def _refused(capsys, argv: list[str], folder: Path) -> str:
    """Exit code 2, one stderr line without a traceback, and `folder` left as it was."""
    before = sorted(folder.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(folder.rglob("*")) == before
    return err.strip()


@pytest.mark.parametrize("args,expected", [
    (["imgz=64"], "yolokd export: error: unknown key 'imgz'. Did you mean 'imgsz'"),
    (["parity_atl=0.1"], "unknown key 'parity_atl'. Did you mean 'parity_atol'"),
    (["epochs=3"], "unknown key 'epochs'."),
    (["format=onx"], "yolokd export: error: format=onx is not an export format. Did you mean 'onnx'?"),
    (["format=pt"], "format=pt is not an export format."),
    (["quantize=8x"], "yolokd export: error: 'quantize=8x' is invalid. Valid 'quantize' values are 8, 16, 32"),
    (["batch=abc"], "yolokd export: error: 'batch=abc' is of invalid type str."),
    (["parity_min_match=2"], "yolokd export: error: parity_min_match=2 must be a number from 0 to 1."),
    (["parity_atol=abc"], "yolokd export: error: parity_atol=abc must be a number from 0 to inf."),
    (["parity=maybe"], "yolokd export: error: parity=maybe must be True or False."),
    (["format=torchscript", "quantize=8"], "yolokd export: error: Ultralytics' exporter refused: ERROR ❌️ quantize=8 "
                                           "(INT8) is not supported; format='torchscript' supports quantize=16"),
])
def test_export_refuses_bad_arguments(capsys, ckpts, args, expected):
    err = _refused(capsys, ["export", f"model={ckpts['det']}", *args], ckpts["det"].parent)
    assert err.startswith(expected) or expected in err, err
    if "unknown key" in expected:
        assert "Valid keys: yolokd's model, parity, parity_atol, parity_min_match, parity_conf" in err


def test_export_refuses_missing_or_wrong_model(capsys, ckpts, tmp_path):
    err = _refused(capsys, ["export", f"model={tmp_path / 'none.pt'}"], tmp_path)
    assert err == (f"yolokd export: error: model={tmp_path / 'none.pt'}: no such file, and not an official Ultralytics "
                   f"model name that could be downloaded; pass a checkpoint, e.g. "
                   f"model=runs/detect/train/weights/best.pt.")
    assert "student=" not in err
    err = _refused(capsys, ["export", "model=yolov8n.yaml"], tmp_path)
    assert "model=yolov8n.yaml is not a .pt checkpoint" in err
    err = _refused(capsys, ["export", f"model={ckpts['cls']}"], ckpts["cls"].parent)
    assert "holds an Ultralytics ClassificationModel, not a DetectionModel" in err
    assert _refused(capsys, ["export", "format=onnx"], tmp_path) == (
        "yolokd export: error: model= is required, e.g. model=runs/detect/student/weights/best.pt")


def test_benchmark_refuses_bad_arguments(capsys, ckpts, tmp_path):
    out = f"out={tmp_path / 'bench'}"
    err = _refused(capsys, ["benchmark", f"models={ckpts['det']}", "iter=3", out], tmp_path)
    assert "unknown benchmark argument(s) ['iter']. Did you mean 'iters'? Valid: models, batch, data" in err
    err = _refused(capsys, ["benchmark", f"models={ckpts['det']},{tmp_path / 'none.pt'}", "val=False", out], tmp_path)
    assert f"models={tmp_path / 'none.pt'}: no such file" in err and "student=" not in err
    err = _refused(capsys, ["benchmark", f"models={ckpts['cls']}", "val=False", out], tmp_path)
    assert "holds an Ultralytics ClassificationModel, not a DetectionModel" in err
    err = _refused(capsys, ["benchmark", f"models={ckpts['det']}", "batch=1,x", out], tmp_path)
    assert err.endswith("batch=1,x must be whole numbers >= 1 separated by commas, e.g. batch=1,8.")
