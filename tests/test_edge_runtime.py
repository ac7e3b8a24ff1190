"""The torch-free edge runtime (export/yolokd_edge, installed with yolokd): pieces against Ultralytics and torchvision,
detections against `predict`, provider options, and the CLI in a process without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from test_export import IMGSZ, students, val_images  # noqa: F401  (shared session fixtures)

from yolokd_edge.runtime import EdgeDetector, decode_dense, letterbox, nms, scale_boxes, select_providers

EXPORT_DIR = Path(__file__).resolve().parents[1] / "export"


# --------------------------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("hw", [(128, 128), (480, 640), (640, 480), (101, 257), (1, 300), (700, 33)])
@pytest.mark.parametrize("shape", [(64, 64), (320, 320), (256, 320)])
def test_letterbox_and_scale_boxes_match_ultralytics(hw, shape):
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.ops import scale_boxes as u_scale

    img = np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)
    ours, gain, pad = letterbox(img, shape)
    np.testing.assert_array_equal(ours, LetterBox(shape, auto=False)(image=img))
    boxes = np.array([[3.0, 5.0, 40.0, 50.0], [0.0, 0.0, shape[1], shape[0]]], np.float32)
    np.testing.assert_allclose(scale_boxes(boxes, gain, pad, hw), u_scale(shape, boxes.copy(), hw), atol=1e-4)


def test_nms_matches_torchvision():
    """OpenCV's NMS keeps exactly the boxes of Ultralytics' NMS (torchvision's `nms` on boxes offset by
    class * 7680 px), in the same order, class-aware and agnostic, for boxes partly at negative coordinates and with
    tied scores (both keep index order). Negative coordinates matter: OpenCV's `NMSBoxesBatched` (and torchvision's
    `batched_nms`) offset classes by (largest coordinate + 1), which lets classes overlap unless `nms` shifts the
    boxes first."""
    import torchvision

    rng = np.random.default_rng(1)
    xy = rng.random((300, 2)) * 200 - 150
    boxes = np.concatenate([xy, xy + 5 + rng.random((300, 2)) * 40], 1).astype(np.float32)
    kept = []
    for scores in (rng.random(300).astype(np.float32), rng.integers(1, 6, 300).astype(np.float32) / 5):
        cls = rng.integers(0, 4, 300)
        for thr in (0.3, 0.5, 0.7):
            t_boxes, t_scores = torch.from_numpy(boxes), torch.from_numpy(scores)
            ref = torchvision.ops.nms(t_boxes + torch.from_numpy(cls)[:, None].float() * 7680, t_scores, thr).numpy()
            np.testing.assert_array_equal(nms(boxes, scores, thr, cls), ref)
            np.testing.assert_array_equal(nms(boxes, scores, thr), torchvision.ops.nms(t_boxes, t_scores, thr).numpy())
            kept.append(len(ref))
    assert kept == [253, 288, 296, 246, 289, 300]  # 300 boxes in: real suppression to compare


def test_nms_negative_coordinates_and_zero_area():
    # two overlapping boxes (IoU 0.38) of different classes far in negative coordinates: both kept
    boxes = np.array([[-300, -300, -190, -290], [-250, -300, -140, -290]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    assert nms(boxes, scores, 0.3, np.array([0, 1])).tolist() == [0, 1]
    assert nms(boxes, scores, 0.3).tolist() == [0]
    # the one documented difference: two equal zero-area boxes are IoU 1 for OpenCV, 0/0 (kept) for torchvision
    flat = np.array([[5, 5, 5, 9], [5, 5, 5, 9], [0, 0, 10, 10]], np.float32)
    assert nms(flat, np.array([0.9, 0.8, 0.7], np.float32), 0.5).tolist() == [0, 2]
    assert nms(flat[:0], scores[:0], 0.5).tolist() == []


def test_decode_dense_hand_made():
    # 3 anchors, 2 classes: rows cx, cy, w, h, score0, score1
    y = np.array([[10, 11, 50], [10, 10, 50], [10, 10, 10], [10, 10, 10],
                  [0.9, 0.8, 0.1], [0.1, 0.2, 0.25]], np.float32)
    det = decode_dense(y, conf=0.25, iou=0.5)  # anchor 1 overlaps anchor 0 (IoU 0.82), same class: suppressed;
    np.testing.assert_allclose(det, [[5, 5, 15, 15, 0.9, 0]])  # anchor 2's 0.25 is not > conf
    y[5, 1] = 0.95  # anchor 1 now votes class 1: class-aware NMS keeps both, best first
    det = decode_dense(y, conf=0.25, iou=0.5)
    np.testing.assert_allclose(det[:, 4:], [[0.95, 1], [0.9, 0]])
    assert len(decode_dense(y, conf=0.25, iou=0.5, agnostic=True)) == 1
    assert decode_dense(y, conf=0.25, iou=0.5, classes=[0])[:, 5].tolist() == [0.0]


def test_select_providers():
    cpu = ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("auto", cpu) == cpu
    assert select_providers("auto", gpu) == gpu
    assert select_providers("cuda", gpu) == gpu[1:]
    assert select_providers("cpu", gpu) == cpu
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        select_providers("tensorrt", cpu)
    assert select_providers("tensorrt", gpu, fp16=True) == [
        ("TensorrtExecutionProvider", {"trt_fp16_enable": True}), *gpu[1:]]
    assert select_providers("auto", gpu, fp16=True, trt_cache="cache/trt") == [
        ("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                       "trt_engine_cache_path": "cache/trt"}), *gpu[1:]]
    assert select_providers("trt", gpu, trt_cache=Path("c"))[0] == (
        "TensorrtExecutionProvider", {"trt_engine_cache_enable": True, "trt_engine_cache_path": "c"})
    for device, available in (("cuda", gpu), ("cpu", gpu), ("auto", cpu)):
        with pytest.raises(ValueError, match="device=tensorrt"):
            select_providers(device, available, fp16=True)


def test_edge_detector_passes_tensorrt_options(monkeypatch, tmp_path):
    """What EdgeDetector and the CLI hand to onnxruntime (no GPU here: the session is faked before it is built)."""
    import onnxruntime as ort

    from yolokd_edge.cli import main

    seen = []

    class Stop(Exception):
        pass

    def fake_session(model, options, providers):
        seen.append((model, providers))
        raise Stop

    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu)
    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    cache = tmp_path / "engines"
    with pytest.raises(Stop):
        EdgeDetector("m.onnx", device="tensorrt", fp16=True, trt_cache=cache)
    assert seen == [("m.onnx", [("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                                                "trt_engine_cache_path": str(cache)}), *gpu[1:]])]
    assert cache.is_dir()
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    with pytest.raises(Stop):
        main([str(model), "source=x.png", "fp16=True", f"trt_cache={tmp_path / 'c2'}"])
    assert seen[-1][1][0] == ("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                                             "trt_engine_cache_path": str(tmp_path / "c2")})
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu[1:])
    assert main([str(model), "source=x.png", "fp16=True"]) == 2  # refused: no TensorRT provider in this build


# --------------------------------------------------------------------------------------------- against predict
def _match_predict(ours: np.ndarray, ref: np.ndarray, conf: float) -> None:
    """Same detections (class, score within 1e-3, box within 1 px), except borderline scores near `conf`."""
    left = list(range(len(ref)))
    for d in ours:
        j = next((j for j in left if ref[j, 5] == d[5] and abs(ref[j, 4] - d[4]) < 1e-3
                  and np.abs(ref[j, :4] - d[:4]).max() < 1.0), None)
        if j is None:
            assert abs(d[4] - conf) < 2e-3, f"edge detection {d} not in predict's output"
        else:
            left.remove(j)
    assert all(abs(ref[j, 4] - conf) < 2e-3 for j in left), f"predict detections {ref[left]} missed by the edge runtime"


@pytest.mark.parametrize("key,nms_arg", [("v8", None), ("26", None), ("26", False)], ids=["v8", "26-nms", "26-e2e"])
def test_edge_matches_ultralytics_predict(students, val_images, tmp_path, key, nms_arg):  # noqa: F811
    from ultralytics import YOLO

    pt = tmp_path / "student.pt"
    pt.write_bytes(students[key]["detecting"].read_bytes())
    f = YOLO(str(pt)).export(format="onnx", imgsz=IMGSZ, nms=nms_arg, simplify=False)
    images = val_images + [cv2.resize(val_images[0][:, :100], (150, 128)), val_images[1][:90]]  # + non-square
    det = EdgeDetector(f, device="cpu", conf=0.25, iou=0.7)
    assert det.rows == (nms_arg is False) and det.imgsz == (IMGSZ, IMGSZ)
    assert det.names == {0: "circle", 1: "square", 2: "triangle", 3: "cross", 4: "star", 5: "ring"}
    ours = det(images)
    assert [len(d) for d in ours] == [len(det(im)[0]) for im in images]  # batch of many == one by one
    ref = YOLO(str(pt)).predict(images, imgsz=IMGSZ, conf=0.25, iou=0.7, nms=nms_arg, verbose=False)
    assert sum(len(d) for d in ours) >= 5 * len(images)
    for o, r in zip(ours, ref):
        _match_predict(o, r.boxes.data.numpy(), 0.25)


def test_edge_cli_without_torch(students, val_images, tmp_path):  # noqa: F811
    """The CLI runs with torch and ultralytics made unimportable; images and a video give JSON and drawings."""
    from ultralytics import YOLO

    pt = tmp_path / "student.pt"
    pt.write_bytes(students["26"]["detecting"].read_bytes())
    onnx = YOLO(str(pt)).export(format="onnx", imgsz=IMGSZ, nms=False, simplify=False)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(val_images[:3]):
        cv2.imwrite(str(folder / f"im{i}.png"), im)
    video = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, val_images[0].shape[1::-1])
    for im in val_images[:4]:
        w.write(im)
    w.release()
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['ultralytics'] = None\n"
        "from yolokd_edge.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in {'torch', 'ultralytics'} and sys.modules[m]]\n"
        "sys.exit(rc)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO")}
    for source, out in ((folder, tmp_path / "out_imgs"), (video, tmp_path / "out_video")):
        r = subprocess.run([sys.executable, "-c", code, onnx, f"source={source}", f"out={out}", "conf=0.3"],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
    assert sum(len(r["detections"]) for r in json.loads((tmp_path / "out_imgs" / "detections.json").read_text()))
    results = json.loads((tmp_path / "out_imgs" / "detections.json").read_text())
    assert [Path(r["source"]).name for r in results] == ["im0.png", "im1.png", "im2.png"]
    ours = EdgeDetector(onnx, device="cpu", conf=0.3)(val_images[:3])
    for rec, d in zip(results, ours):
        assert [x["class_id"] for x in rec["detections"]] == d[:, 5].astype(int).tolist()
        np.testing.assert_allclose([x["box_xyxy"] for x in rec["detections"]] or np.zeros((0, 4)), d[:, :4], atol=0.01)
        assert all(set(x) == {"class_id", "name", "confidence", "box_xyxy"} for x in rec["detections"])
    drawn = cv2.imread(str(tmp_path / "out_imgs" / "im0.jpg"))
    assert drawn.shape == val_images[0].shape and np.abs(drawn.astype(int) - val_images[0]).mean() > 1
    lines = (tmp_path / "out_video" / "clip.jsonl").read_text().splitlines()
    assert [json.loads(s)["frame"] for s in lines] == [0, 1, 2, 3]
    assert (tmp_path / "out_video" / "clip.mp4").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-c", code, onnx, "source=/nonexistent/x.png"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "no images found" in bad.stderr
