"""Loading a user's checkpoint for export never runs code it carries, and unpickles the file once per export."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import save_checkpoint
from test_export import IMGSZ, students  # noqa: F401  (shared session fixture)
from yolokd.cli import main
from yolokd.config import DistillationConfigError
from yolokd.export.command import export_student
from yolokd.export.safety import load_student


def pickle_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-2 pickle that calls `module.name(arg)` (what a malicious .pt carries)."""
    a = arg.encode()
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(a)) + a + b"\x85R."


def checkpoint_with_pickle(path: Path, data: bytes) -> Path:
    """A torch zip checkpoint whose data.pkl is `data` (the other records from a real torch.save)."""
    base = path.with_suffix(".base")
    torch.save({"x": 1}, base)
    with zipfile.ZipFile(base) as zin, zipfile.ZipFile(path, "w") as zout:
        for n in zin.namelist():
            zout.writestr(n, data if n.endswith("/data.pkl") else zin.read(n))
    base.unlink()
    return path


class WritesMarker:
    """Pickles as a call of `func(code)`: the payload writes a marker file when it runs."""

    def __init__(self, func, code: str):
        self.func, self.code = func, code

    def __reduce__(self):
        return self.func, (self.code,)


def _refused_one_line(capsys, pt: Path, *expected: str) -> str:
    """`yolokd export model=pt` exits 2 with one line on stderr (no traceback) and writes nothing next to `pt`."""
    before = sorted(pt.parent.iterdir())
    assert main(["export", f"model={pt}", f"imgsz={IMGSZ}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    assert sorted(pt.parent.iterdir()) == before
    return err


@pytest.mark.parametrize("proto", [2, 4])
def test_exec_payload_is_refused_and_never_runs(tmp_path, capsys, proto):
    marker = tmp_path / "marker"
    payload = WritesMarker(exec, f"open({str(marker)!r}, 'w').write('ran')")
    pt = tmp_path / "evil.pt"
    torch.save({"model": payload, "train_args": {}}, pt, pickle_protocol=proto)
    with pytest.raises(DistillationConfigError, match=r"pickle references builtins\.exec, outside .* could run code"):
        load_student(pt)
    _refused_one_line(capsys, pt, "references builtins.exec")
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"), ("builtins", "eval"),
                                         ("builtins", "getattr"), ("builtins", "__import__"),
                                         ("subprocess", "check_call"), ("yolokd.cli", "main"), ("numpy", "load")])
def test_dangerous_globals_are_refused(tmp_path, capsys, module, name):
    marker = tmp_path / "marker"
    pt = checkpoint_with_pickle(tmp_path / "evil.pt", pickle_call(module, name, f"touch {marker}"))
    with pytest.raises(DistillationConfigError, match=rf"its pickle references {module}\.{name}, "):
        load_student(pt)
    err = _refused_one_line(capsys, pt, f"references {module}.{name}")
    assert ("a yolokd class" in err) == (module == "yolokd.cli")
    assert not marker.exists()


def test_allowed_class_is_never_constructed(tmp_path, capsys):
    """Calling an allowed class runs its constructor on the file's data: DetectionModel(cfg) evaluates
    cfg['activation'] with eval. A checkpoint restores modules from their state, so such a call is refused."""
    from ultralytics.nn.tasks import DetectionModel

    marker = tmp_path / "marker"
    cfg = {"activation": f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')", "nc": 1,
           "backbone": [[-1, 1, "Conv", [16, 3, 2]]], "head": []}  # enough for the old loader to reach eval()
    pt = tmp_path / "ctor.pt"
    torch.save({"model": WritesMarker(DetectionModel, cfg)}, pt)
    with pytest.raises(DistillationConfigError, match=r"calls ultralytics\.nn\.tasks\.DetectionModel on data"):
        load_student(pt)
    _refused_one_line(capsys, pt, "calls ultralytics.nn.tasks.DetectionModel")
    assert not marker.exists()


def test_real_checkpoints_load_unchanged(tmp_path, students):  # noqa: F811
    """Random-init checkpoints (v8, YOLO26) and best.pt files of real 1-epoch Ultralytics training runs load with
    every tensor equal to an unrestricted torch.load."""
    made = [save_checkpoint(tmp_path / f"{cfg}.pt", f"{cfg}.yaml", {0: "a", 1: "b"}) for cfg in ("yolov8n", "yolo26n")]
    trained = [students[k]["distilled"] for k in ("v8", "26")]
    for pt in made + trained:
        ckpt = load_student(pt)
        ref = torch.load(pt, map_location="cpu", weights_only=False)
        assert type(ckpt["model"]) is type(ref["model"]) and ckpt["model"].names == ref["model"].names
        ours, theirs = ckpt["model"].state_dict(), ref["model"].state_dict()
        assert list(ours) == list(theirs) and len(ours) > 100
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert load_student(trained[0])["train_args"]["epochs"] == 1


def test_non_detector_is_refused(tmp_path, capsys):
    pt = save_checkpoint(tmp_path / "cls.pt", "yolov8n-cls.yaml", {0: "a", 1: "b"})
    with pytest.raises(DistillationConfigError, match="holds an Ultralytics ClassificationModel, not a DetectionModel"):
        load_student(pt)
    _refused_one_line(capsys, pt, "ClassificationModel", "pass a detection checkpoint")


def test_export_unpickles_once(students, tmp_path, monkeypatch):  # noqa: F811
    """One ONNX export with its parity check reads the checkpoint once (the restricted load), never again."""
    pt = tmp_path / "student.pt"
    pt.write_bytes(students["v8"]["detecting"].read_bytes())
    loads = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        loads.append((Path(f).name, kwargs.get("pickle_module")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    f = export_student(pt, format="onnx", imgsz=IMGSZ, simplify=False)
    assert f.is_file() and len(loads) == 1
    assert loads[0][0] == "student.pt" and loads[0][1].Unpickler.__name__ == "CheckpointUnpickler"


def test_random_init_checkpoint_exports(tmp_path):
    """A checkpoint as tests/helpers.py writes it exports, and its parity check passes on raw outputs only (a random
    head scores no box above 0.25)."""
    pt = save_checkpoint(tmp_path / "rand.pt", "yolov8n.yaml", {0: "a", 1: "b"})
    f = export_student(pt, format="onnx", imgsz=IMGSZ, simplify=False)
    assert f == tmp_path / "rand.onnx" and f.stat().st_size > 1e6


def test_unreadable_files_are_refused(tmp_path, capsys):
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), tmp_path / "script.pt")
    torch.save({"x": 1}, tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "image.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    for name, expected in (("script.pt", "is a TorchScript archive, not an Ultralytics checkpoint"),
                           ("cut.pt", "is not a torch zip checkpoint"), ("image.pt", "is not a torch zip checkpoint"),
                           ("whole.pt", "holds no model under 'model'/'ema'")):
        _refused_one_line(capsys, tmp_path / name, f"'{tmp_path / name}' {expected}")
