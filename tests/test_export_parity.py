"""The parity check runs what ships (the installed edge runtime, without torch), and never passes on nothing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_export import IMGSZ, students, val_images  # noqa: F401  (shared session fixtures)
from yolokd.export.command import export_student
from yolokd.export.parity import ParityError, compare, export_parity, format_parity

EXPORT_DIR = Path(__file__).resolve().parents[1] / "export"


def _export(students, tmp_path, key: str, kind: str = "detecting", **args) -> tuple[Path, Path]:  # noqa: F811
    pt = tmp_path / "student.pt"
    pt.write_bytes(students[key][kind].read_bytes())
    return pt, export_student(pt, format="onnx", imgsz=IMGSZ, simplify=False, parity=False, **args)


def test_onnx_side_is_the_installed_edge_runtime_without_torch(students, val_images, tmp_path):  # noqa: F811
    import yolokd_edge
    from yolokd_edge.record import torch_free

    # installed with yolokd (pyproject package-dir), not found through a sys.path entry added for the tests
    assert Path(yolokd_edge.__file__).resolve() == EXPORT_DIR / "yolokd_edge" / "__init__.py"
    assert not any(Path(p or ".").resolve() == EXPORT_DIR for p in sys.path)
    assert torch_free() is False  # the probe sees torch in this process, which imported it

    pt, onnx = _export(students, tmp_path, "v8")
    r = export_parity(pt, onnx, val_images)
    assert r["edge"]["torch_free"] is True  # the process that ran the ONNX side had neither torch nor Ultralytics
    assert Path(r["edge"]["edge_file"]).resolve() == Path(yolokd_edge.__file__).resolve()
    assert r["edge"]["providers"] == ["CPUExecutionProvider"]
    assert r["passed"] and r["matched"] == r["total"] >= 8 * len(val_images) and r["max_box_dev_px"] < 1e-3


def test_edge_runtime_failure_is_a_parity_error(students, val_images, tmp_path):  # noqa: F811
    pt, onnx = _export(students, tmp_path, "v8")
    onnx.write_bytes(b"not an onnx file")
    with pytest.raises(ParityError, match="the edge runtime yolokd_edge failed on .*student.onnx: "):
        export_parity(pt, onnx, val_images)


# --------------------------------------------------------------------------------------------- nothing compared
def _report(rows: bool, precision: str, torch_score: float, export_score: float) -> dict:
    """`compare` on one image with one anchor (dense) or one row whose scores are given."""
    if rows:
        t = np.array([[[1, 2, 11, 12, torch_score, 0]]], np.float32)
        e = np.array([[[1, 2, 11, 12, export_score, 0]]], np.float32)
    else:
        t = np.array([[[6], [7], [10], [10], [torch_score]]], np.float32)
        e = np.array([[[6], [7], [10], [10], [export_score]]], np.float32)
    dets = lambda s: [np.array([[1, 2, 11, 12, s, 0]], np.float32)[: int(s > 0.25)]]  # noqa: E731
    r = compare(t, e, dets(torch_score), dets(export_score), rows, precision, conf=0.25)
    r.update(n_images=1, imgsz=[64, 64])
    return r


def test_no_detection_passes_only_on_raw_outputs_and_says_so():
    r = _report(rows=False, precision="fp32", torch_score=0.01, export_score=0.011)
    assert r["passed"] and r["total"] == 0 and r["match_rate"] is None and r["raw_compared"] == 5
    assert r["note"] == "no detection above conf 0.25 on either side, so no detection was matched: raw outputs only"
    line = format_parity(r)
    assert line.endswith("detections matched 0/0 (none above conf 0.25 on either side) -> PASSED on raw outputs "
                         "only (no detection was matched)")
    r = _report(rows=False, precision="fp32", torch_score=0.01, export_score=0.2)  # raw beyond tolerance
    assert not r["passed"] and r["failures"] == ["max |ONNX - PyTorch| = 0.19 > atol 0.01"]


@pytest.mark.parametrize("rows,precision,why", [(False, "int8", "raw INT8 outputs have no tolerance"),
                                                (True, "fp32", "no raw row above it")])
def test_nothing_compared_fails(rows, precision, why):
    r = _report(rows=rows, precision=precision, torch_score=0.01, export_score=0.01)
    assert not r["passed"] and r["total"] == 0
    assert r["failures"] == [f"nothing was compared: no detection above conf 0.25 on either side, and {why}; pass "
                             f"parity_conf= lower (e.g. 0.01) to compare low-score boxes, or parity=False to skip "
                             f"the check"]
    assert "PASSED" not in format_parity(r) and "-> FAILED: nothing was compared" in format_parity(r)
    assert _report(rows=rows, precision=precision, torch_score=0.9, export_score=0.9)["passed"]  # one detection


def test_untrained_students(students, val_images, tmp_path):  # noqa: F811
    """The 1-epoch distilled students score no box above 0.25: the dense export passes on raw outputs alone, the
    end-to-end rows export (raw rows only compared above conf) fails; a lower conf makes it compare rows."""
    pt, onnx = _export(students, tmp_path, "v8", "distilled")
    r = export_parity(pt, onnx, val_images)
    assert r["passed"] and r["total"] == 0 and r["raw_compared"] == r["n_images"] * 10 * 84 and r["note"]
    pt, onnx = _export(students, tmp_path, "26", "distilled", nms=False)
    r = export_parity(pt, onnx, val_images)
    assert not r["passed"] and r["failures"][0].startswith("nothing was compared")
    with pytest.raises(ParityError, match="nothing was compared"):
        export_student(pt, format="onnx", imgsz=IMGSZ, simplify=False, nms=False)
    assert export_parity(pt, onnx, val_images, conf=0.0)["raw_compared"] == len(val_images) * 84  # every row


# --------------------------------------------------------------------------------------------- TensorRT
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("tensorrt") is None,
                    reason="needs an NVIDIA GPU and the tensorrt package")
def test_engine_parity(students, val_images, tmp_path):  # noqa: F811
    pt = tmp_path / "student.pt"
    pt.write_bytes(students["v8"]["detecting"].read_bytes())
    engine = export_student(pt, format="engine", imgsz=IMGSZ, quantize=16, parity=False)
    r = export_parity(pt, engine, val_images)
    assert r["side"] == "TensorRT" and r["precision"] == "fp16" and r["passed"], r
    assert r["total"] >= 8 * len(val_images) and r["match_rate"] >= 0.9
    assert export_student(pt, format="engine", imgsz=IMGSZ, quantize=16) == engine  # both checks inside pass
