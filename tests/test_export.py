"""Export of distilled students: clean-student check, ONNX export, ONNX-vs-PyTorch parity (v8 and YOLO26).

The session fixture `students` trains two tiny distilled students (1 epoch, 16 images, 64 px, FitNet from a
yolov8s.yaml teacher) and is shared with test_edge_runtime.py and test_latency_bench.py. Such students predict the
same near-zero scores everywhere (their eval-mode features have not left the initialisation), so every comparison
of detections would compare empty sets. `detecting_copy` therefore derives, from each distilled checkpoint, a copy
that detects: BatchNorm statistics re-estimated on training images (gammas x 0.9 to stay out of the chaotic regime
of a random deep net), and the last 1x1 convs of the class / box branches redrawn (seeded) so that logits and box
distances vary with the image. The copy is still a plain Ultralytics checkpoint; only runtime equivalence is tested
on it, never accuracy.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from yolokd.config import DistillationConfigError
from yolokd.export.command import cmd_export, export_student
from yolokd.export.parity import ParityError, export_parity, match_detections, rows_diff
from yolokd.export.safety import load_student

IMGSZ = 64
_BUILT: dict[str, dict] = {}  # the students, built once per session even when several modules use the fixture


def detecting_copy(src: Path, dst: Path, images: list[np.ndarray], gain: float = 2.0, target: float = -4.5,
                   seed: int = 0) -> Path:
    """A copy of checkpoint `src` whose head gives image-dependent detections (see module docstring)."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    model = (ckpt.get("ema") or ckpt["model"]).float()
    x = torch.stack([torch.from_numpy(cv2.resize(im, (IMGSZ, IMGSZ))[..., ::-1].copy()).permute(2, 0, 1)
                     for im in images]).float() / 255
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: the statistics of exactly these images
    model.train()
    with torch.no_grad():
        model(x)
    for m in bns:
        m.weight.data.mul_(0.9)
    model.eval()
    head = model.model[-1]
    last = lambda name: [seq[-1] for seq in (getattr(head, name, None) or [])]  # noqa: E731
    cls_convs, box_convs = last("cv3") + last("one2one_cv3"), last("cv2") + last("one2one_cv2")
    stats = {}
    hooks = [c.register_forward_pre_hook(lambda m, a: stats.__setitem__(m, a[0].transpose(0, 1).flatten(1)))
             for c in cls_convs + box_convs]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(seed)

    def redraw(conv: nn.Conv2d, scale: float, bias: torch.Tensor) -> None:
        f = stats[conv]
        mu, sd = f.mean(1), f.std(1) + 1e-6
        w = scale * torch.randn(conv.weight.shape, generator=g) / (sd.view(1, -1, 1, 1) * conv.in_channels ** 0.5)
        conv.weight.copy_(w)
        conv.bias.copy_(bias - (w[:, :, 0, 0] * mu).sum(1))

    with torch.no_grad():
        for c in cls_convs:  # logits ~ N(target, gain^2) over anchors and images
            redraw(c, gain, torch.full((c.out_channels,), target))
        for c in box_convs:  # distances of about 1.5 grid cells per side
            if head.reg_max == 1:
                redraw(c, 0.1, torch.full((4,), 1.5))
            else:
                bins = torch.arange(head.reg_max, dtype=torch.float32)
                redraw(c, 0.1, (-0.5 * (bins - 1.5) ** 2).repeat(4))
    ckpt["model"], ckpt["ema"] = model.half(), None
    torch.save(ckpt, dst)
    return dst


def data_images(data_yaml: str, split: str, n: int) -> list[Path]:
    """The first `n` images of a split of a YOLO-format dataset."""
    root = Path(data_yaml).parent / "images" / split
    return sorted(root.glob("*.png"))[:n]


def build_students(tmp_path_factory, tiny_data: str, train_kwargs: dict) -> dict:
    """{'v8': {...}, '26': {...}}: each with 'distilled' (best.pt of a DistillationTrainer run) and 'detecting'."""
    if "students" in _BUILT:
        return _BUILT["students"]
    from ultralytics import YOLO

    from yolokd import DistillationTrainer

    root = tmp_path_factory.mktemp("students")
    calib = [cv2.imread(str(p)) for p in data_images(tiny_data, "train", 16)]
    out = {}
    for key, cfg in (("v8", "yolov8n.yaml"), ("26", "yolo26n.yaml")):
        args = {**train_kwargs, "project": str(root), "name": key, "val": False, "fraction": 16 / 48}
        YOLO(cfg).train(trainer=DistillationTrainer, teacher="yolov8s.yaml", method="fitnet", data=tiny_data, **args)
        best = root / key / "weights" / "best.pt"
        out[key] = {"distilled": best, "detecting": detecting_copy(best, root / f"{key}_detecting.pt", calib)}
    out["data"] = tiny_data
    _BUILT["students"] = out
    return out


@pytest.fixture(scope="session")
def students(tmp_path_factory, tiny_data, train_kwargs) -> dict:
    """Two tiny distilled students (v8, YOLO26) and their detecting copies; trained once per session."""
    return build_students(tmp_path_factory, tiny_data, train_kwargs)


@pytest.fixture(scope="session")
def val_images(students) -> list[np.ndarray]:
    return [cv2.imread(str(p)) for p in data_images(students["data"], "val", 8)]


# --------------------------------------------------------------------------------------------- clean student
class Foreign:
    """A class of another package (this test module): a checkpoint that pickles it is not a plain student."""


def test_restricted_load_names_foreign_class(tmp_path):
    ckpt = {"model": nn.Conv2d(1, 1, 1), "extra": Foreign()}
    for proto in (2, 4):  # GLOBAL opcodes (torch.save default) and STACK_GLOBAL with memoised strings
        p = tmp_path / f"p{proto}.pt"
        torch.save(ckpt, p, pickle_protocol=proto)
        with pytest.raises(DistillationConfigError, match=rf"references {__name__}\.Foreign, outside"):
            load_student(p)


def test_scan_refuses_non_zip(tmp_path):
    p = tmp_path / "legacy.pt"
    p.write_bytes(pickle.dumps({"model": None}))
    with pytest.raises(DistillationConfigError, match="not a torch zip checkpoint"):
        load_student(p)


def test_distilled_students_are_clean(students):
    for key in ("v8", "26"):
        for kind in ("distilled", "detecting"):
            ckpt = load_student(students[key][kind])  # raises if not
            assert type(ckpt["model"]).__name__ == "DetectionModel"


def _ckpt_with(tmp_path, students, name: str, change) -> Path:
    ckpt = torch.load(students["v8"]["distilled"], map_location="cpu", weights_only=False)
    change(ckpt["model"])
    p = tmp_path / f"{name}.pt"
    torch.save(ckpt, p)
    return p


def test_clean_check_rejects_foreign_class_hook_teacher(tmp_path, students):
    from ultralytics.nn.tasks import DetectionModel

    from yolokd.taps import Taps

    foreign = _ckpt_with(tmp_path, students, "foreign", lambda m: setattr(m, "note", Foreign()))
    with pytest.raises(DistillationConfigError, match=r"test_export\.Foreign"):
        load_student(foreign)
    tapped = _ckpt_with(tmp_path, students, "tapped", lambda m: Taps(m, {"cls_feat"}))  # yolokd hook objects
    with pytest.raises(DistillationConfigError, match=r"yolokd\.taps"):
        load_student(tapped)
    # Ultralytics/torch classes only, so the scan passes: the model inspection must catch these
    teacher = _ckpt_with(tmp_path, students, "teacher",
                         lambda m: setattr(m, "teacher", DetectionModel("yolov8n.yaml", nc=6, verbose=False)))
    with pytest.raises(DistillationConfigError, match="submodule 'teacher'"):
        load_student(teacher)
    hooked = _ckpt_with(tmp_path, students, "hooked", lambda m: m.model[0].register_forward_hook(nn.Identity()))
    with pytest.raises(DistillationConfigError, match="1 forward hooks on model.0"):
        load_student(hooked)


# --------------------------------------------------------------------------------------------- parity helpers
def test_match_detections_hand_computed():
    a = np.array([[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 1], [50, 50, 60, 60, 0.7, 2]], np.float32)
    b = np.array([[0, 0, 10, 11, 0.9, 0],  # IoU 100/110 = 0.91 with a[0]: match, deviation 1 px
                  [20, 20, 30, 30, 0.8, 2],  # same box as a[1], other class: no match
                  [50, 50, 60, 65, 0.7, 2]], np.float32)  # IoU 100/150 = 0.67 with a[2]: match, deviation 5 px
    assert match_detections(a, b) == (2, 5.0)
    assert match_detections(a, b, iou_thr=0.7) == (1, 1.0)
    assert match_detections(a, b[:0]) == (0, 0.0)
    flat = np.array([[5, 5, 5, 9, 0.5, 1]], np.float32)  # zero area: IoU undefined, equal corners still match
    assert match_detections(flat, flat + [0.25, 0, 0.25, 0, 0, 0]) == (1, 0.25)


def test_rows_diff_ignores_row_order():
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.random((1, 5, 4)) * 60, rng.random((1, 5, 1)), rng.integers(0, 3, (1, 5, 1))], -1)
    assert rows_diff(rows, rows[:, ::-1], conf=0.0) == 0.0
    moved = rows.copy()
    moved[0, :, 0] += 0.5
    assert rows_diff(rows, moved[:, ::-1], conf=0.0) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------- export + parity
@pytest.mark.parametrize("key,nms", [("v8", None), ("26", None), ("26", False)], ids=["v8", "26-nms", "26-e2e"])
def test_onnx_export_parity(students, val_images, tmp_path, key, nms):
    pt = tmp_path / "student.pt"
    pt.write_bytes(students[key]["detecting"].read_bytes())
    f = export_student(pt, format="onnx", imgsz=IMGSZ, nms=nms, simplify=False, parity=False)
    assert f.suffix == ".onnx" and f.is_file()
    r = export_parity(pt, f, val_images)
    assert r["passed"], r
    assert r["layout"].startswith("rows" if nms is False else "dense")
    assert r["total"] >= 8 * len(val_images)  # the detecting copies give real detection sets to compare
    assert r["matched"] == r["total"] and r["match_rate"] == 1.0
    assert r["max_abs_diff"] < 1e-3 and r["max_box_dev_px"] < 1e-3


def _perturb_onnx(path: Path, scale: float = 0.5) -> None:
    """Add `scale` to every bias of the class branches' last convs of an ONNX file, in place."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    hit = 0
    for init in m.graph.initializer:
        if "cv3" in init.name and init.name.endswith("bias") and len(init.dims) == 1 and init.dims[0] == 6:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(scale), init.name))
            hit += 1
    assert hit, [i.name for i in m.graph.initializer if "cv3" in i.name]
    onnx.save(m, str(path))


def test_parity_fails_on_perturbed_onnx(students, val_images, tmp_path):
    pt = tmp_path / "student.pt"
    pt.write_bytes(students["v8"]["detecting"].read_bytes())
    f = export_student(pt, format="onnx", imgsz=IMGSZ, simplify=False, parity=False)
    assert export_parity(pt, f, val_images)["passed"]
    _perturb_onnx(f)
    r = export_parity(pt, f, val_images)
    assert not r["passed"]
    assert r["max_abs_diff_scores"] > 0.01 and r["max_abs_diff_boxes"] < 1e-3  # only the scores were touched
    assert any("atol" in s for s in r["failures"])


def test_cmd_export_passes_and_fails(students, tmp_path, monkeypatch, capsys):
    from ultralytics import YOLO

    pt = tmp_path / "student.pt"
    pt.write_bytes(students["26"]["detecting"].read_bytes())
    assert cmd_export([f"model={pt}", "format=onnx", f"imgsz={IMGSZ}", "simplify=False", "nms=False"]) == 0
    assert f"yolokd export: {pt.with_suffix('.onnx')}" in capsys.readouterr().out

    real_export = YOLO.export

    def export_then_tamper(self, **kw):  # the exported file differs from the checkpoint before parity runs
        f = real_export(self, **kw)
        _perturb_onnx(Path(f), scale=3.0)
        return f

    monkeypatch.setattr(YOLO, "export", export_then_tamper)
    assert cmd_export([f"model={pt}", f"imgsz={IMGSZ}", "simplify=False"]) == 1
    assert "parity check failed" in capsys.readouterr().err
    with pytest.raises(ParityError):
        export_student(pt, imgsz=IMGSZ, simplify=False)
    assert cmd_export([f"model={pt}", f"imgsz={IMGSZ}", "simplify=False", "parity=False"]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_engine_export_refused_without_gpu(students, tmp_path):
    pt = tmp_path / "student.pt"
    pt.write_bytes(students["v8"]["distilled"].read_bytes())
    with pytest.raises(DistillationConfigError, match="NVIDIA GPU") as e:
        cmd_export([f"model={pt}", "format=engine", f"imgsz={IMGSZ}"])
    assert "tensorrt" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pt"]  # refused before exporting anything


def test_export_refuses_unclean_checkpoint(tmp_path, students):
    bad = _ckpt_with(tmp_path, students, "bad", lambda m: setattr(m, "note", Foreign()))
    with pytest.raises(DistillationConfigError, match="not a clean student"):
        export_student(bad, imgsz=IMGSZ)
    assert not bad.with_suffix(".onnx").exists()
