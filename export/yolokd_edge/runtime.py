"""Run an Ultralytics YOLO detector exported to ONNX with ONNX Runtime, numpy and OpenCV only (no torch).

The pipeline reproduces Ultralytics' predict for a static-shape ONNX export:

1. letterbox: scale the image by r = min(H / h, W / w) (sides rounded, at least 1 px, bilinear), pad it centred to
   the model's (H, W) with grey 114 (the left/top pad is round(d / 2 - 0.1), the rest on the right/bottom);
   BGR -> RGB, HWC -> CHW, uint8 / 255 -> float32 (float16 when the model's input is).
2. inference on the chosen ONNX Runtime execution provider (TensorRT, optionally FP16 and with an engine cache;
   CUDA; or CPU).
3. decode, depending on the output layout:
   - dense (B, 4 + nc, A): per anchor (cx, cy, w, h) in input pixels and nc class scores in [0, 1]; keep the best
     class when its score > conf, xywh -> xyxy, class-aware greedy NMS with OpenCV (a box is dropped when its IoU
     with a kept, higher-scored box of the same class is > iou; see `nms`), at most `max_det` boxes;
   - rows (B, K, 6) = (x1, y1, x2, y2, score, class): end-to-end heads (YOLO26 exported with nms=False) or
     exports with NMS inside the graph (nms=True); rows are already final: keep score > conf, at most max_det.
4. undo the letterbox: subtract the pad, divide by the per-axis scale, clip to the original image.

Class names, the input size and the layout flags come from the metadata Ultralytics writes into the ONNX file
(`names`, `imgsz`, `end2end`, `args`).
"""

from __future__ import annotations

import ast
import time
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

MAX_NMS = 30000  # boxes entering NMS at most (highest scores first)
TENSORRT = "TensorrtExecutionProvider"
PROVIDER_CHAIN = {
    "tensorrt": [TENSORRT, "CUDAExecutionProvider", "CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "cpu": ["CPUExecutionProvider"],
}


def tensorrt_options(fp16: bool = False, trt_cache: str | Path | None = None) -> dict[str, Any]:
    """ONNX Runtime TensorRT provider options: FP16 kernels, and an engine cache folder (built engines are reused
    across runs instead of rebuilt, which takes minutes on a Jetson)."""
    options: dict[str, Any] = {}
    if fp16:
        options["trt_fp16_enable"] = True
    if trt_cache:
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache))
    return options


def select_providers(device: str = "auto", available: Sequence[str] | None = None, fp16: bool = False,
                     trt_cache: str | Path | None = None) -> list:
    """ONNX Runtime providers for `device` ('auto', 'cpu', 'cuda', 'tensorrt'), in order of preference.

    'auto' picks the fastest one this onnxruntime build offers (TensorRT, then CUDA, then CPU). An explicit device
    that the build lacks raises ValueError (e.g. `onnxruntime` instead of `onnxruntime-gpu`). `fp16` and `trt_cache`
    become the TensorRT provider's options (`tensorrt_options`): the entry is then `(name, options)`; they raise
    ValueError when the chosen device does not run TensorRT.
    """
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    device = str(device).lower()
    if device in {"gpu", "0"}:
        device = "cuda"
    if device in {"trt", "engine"}:
        device = "tensorrt"
    if device == "auto":
        device = next(d for d in ("tensorrt", "cuda", "cpu") if PROVIDER_CHAIN[d][0] in available or d == "cpu")
    if device not in PROVIDER_CHAIN:
        raise ValueError(f"device={device!r} is not one of auto, cpu, cuda, tensorrt")
    chain = PROVIDER_CHAIN[device]
    if chain[0] not in available:
        raise ValueError(
            f"device={device} needs ONNX Runtime's {chain[0]}, which this onnxruntime build lacks (it has "
            f"{list(available)}). Install onnxruntime-gpu (CUDA/TensorRT) or use device=cpu."
        )
    providers: list = [p for p in chain if p in available]
    options = tensorrt_options(fp16, trt_cache)
    if options:
        if device != "tensorrt":
            raise ValueError(
                f"fp16= and trt_cache= are options of ONNX Runtime's TensorRT provider, but device={device} does not "
                f"use it: pass device=tensorrt (onnxruntime-gpu with TensorRT), or drop them."
            )
        providers[0] = (TENSORRT, options)
    return providers


def letterbox(img: np.ndarray, shape: tuple[int, int], pad_value: int = 114):
    """Resize keeping the aspect ratio and pad centred to `shape` (h, w), as Ultralytics' predict does.

    Returns:
        (padded image, (gain_x, gain_y), (pad_left, pad_top)): what `scale_boxes` needs to map boxes back.
    """
    h, w = img.shape[:2]
    r = min(shape[0] / h, shape[1] / w)
    nw, nh = max(round(w * r), 1), max(round(h * r), 1)
    if (nw, nh) != (w, h):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    dw, dh = (shape[1] - nw) / 2, (shape[0] - nh) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
    return img, (nw / w, nh / h), (left, top)


def scale_boxes(boxes: np.ndarray, gain: tuple[float, float], pad: tuple[int, int], shape: tuple[int, int]):
    """Map xyxy boxes from the letterboxed input back to the original image of `shape` (h, w), clipped."""
    out = boxes.astype(np.float32, copy=True)
    out[:, [0, 2]] = (out[:, [0, 2]] - pad[0]) / gain[0]
    out[:, [1, 3]] = (out[:, [1, 3]] - pad[1]) / gain[1]
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, shape[1])
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, shape[0])
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, classes: np.ndarray | None = None) -> np.ndarray:
    """Greedy NMS with OpenCV: indices of the kept boxes, highest score first.

    A box is dropped when its IoU with a kept, higher-scored box is > `iou`; with `classes`, only boxes of the same
    class suppress each other (`cv2.dnn.NMSBoxesBatched`), else all do (`cv2.dnn.NMSBoxes`). Equal scores keep
    index order. Scores must be > 0 (OpenCV keeps only scores above its threshold, 0 here).

    Same result as torchvision's `nms` / `batched_nms` (what Ultralytics uses), except that two zero-area boxes
    count as IoU 1 for OpenCV (the later one is dropped) and as IoU 0/0 for torchvision (both are kept).
    `NMSBoxesBatched` separates classes by offsetting them by class * (largest coordinate + 1), which only works
    for coordinates >= 0: boxes are shifted into that range first (IoU does not change under a shift).
    """
    if not len(boxes):
        return np.zeros(0, dtype=np.int64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:4] - boxes[:, :2]], 1).astype(np.float64)
    xywh[:, :2] -= min(xywh[:, :2].min(), 0.0)
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    if classes is None:
        keep = cv2.dnn.NMSBoxes(xywh, scores, 0.0, iou)
    else:
        keep = cv2.dnn.NMSBoxesBatched(xywh, scores, np.asarray(classes, dtype=np.int32), 0.0, iou)
    return np.asarray(keep, dtype=np.int64).reshape(-1)


def decode_dense(y: np.ndarray, conf: float, iou: float, max_det: int = 300, classes=None, agnostic=False):
    """One image's dense output (4 + nc, A) -> (N, 6) xyxy, score, class after class-aware NMS (input pixels)."""
    scores_all = y[4:].T
    cls = scores_all.argmax(1)
    score = scores_all[np.arange(len(cls)), cls]
    keep = score > conf
    if classes is not None:
        keep &= np.isin(cls, classes)
    xywh, score, cls = y[:4].T[keep], score[keep], cls[keep]
    if len(score) > MAX_NMS:
        top = np.argsort(-score, kind="stable")[:MAX_NMS]
        xywh, score, cls = xywh[top], score[top], cls[top]
    xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    idx = nms(xyxy, score, iou, None if agnostic else cls)[:max_det]
    return np.concatenate([xyxy[idx], score[idx, None], cls[idx, None].astype(np.float32)], 1).astype(np.float32)


def decode_rows(y: np.ndarray, conf: float, max_det: int = 300, classes=None):
    """One image's row output (K, 6) (already NMS-free or NMS-ed) -> (N, 6) rows with score > conf."""
    keep = y[:, 4] > conf
    if classes is not None:
        keep &= np.isin(y[:, 5].astype(np.int64), classes)
    return y[keep][:max_det].astype(np.float32)


def read_metadata(session) -> dict[str, Any]:
    """Ultralytics' ONNX metadata with Python values (`names` dict, `imgsz` list, `end2end` bool, `args` dict)."""
    out = {}
    for k, v in session.get_modelmeta().custom_metadata_map.items():
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


class EdgeDetector:
    """An exported YOLO detector: `detector(image)` -> list of (N, 6) arrays (x1, y1, x2, y2, score, class).

    Args:
        model: Path of the .onnx file exported by Ultralytics / `yolokd export`.
        device: 'auto', 'cpu', 'cuda' or 'tensorrt' (ONNX Runtime execution provider, see `select_providers`).
        conf: Confidence threshold (a box is kept when its score is > conf).
        iou: NMS IoU threshold (ignored for row outputs, which need no NMS).
        max_det: Most detections per image.
        classes: Keep only these class ids (None: all).
        agnostic: Class-agnostic NMS.
        fp16: TensorRT provider only: let TensorRT use FP16 kernels.
        trt_cache: TensorRT provider only: folder where built engines are cached and reused (created if missing).
    """

    def __init__(self, model: str | Path, device: str = "auto", conf: float = 0.25, iou: float = 0.7,
                 max_det: int = 300, classes: Sequence[int] | None = None, agnostic: bool = False,
                 fp16: bool = False, trt_cache: str | Path | None = None):
        import onnxruntime as ort

        providers = select_providers(device, fp16=fp16, trt_cache=trt_cache)
        if trt_cache:
            Path(trt_cache).mkdir(parents=True, exist_ok=True)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model), options, providers=providers)
        self.providers = self.session.get_providers()
        self.conf, self.iou, self.max_det, self.agnostic = conf, iou, max_det, agnostic
        self.classes = None if classes is None else list(classes)
        self.meta = read_metadata(self.session)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.dtype = np.float16 if "float16" in inp.type else np.float32
        static_hw = [d for d in inp.shape[2:] if isinstance(d, int)]
        imgsz = self.meta.get("imgsz") or (static_hw if len(static_hw) == 2 else 640)
        self.imgsz = (imgsz, imgsz) if isinstance(imgsz, int) else (int(imgsz[0]), int(imgsz[-1]))
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None  # None: dynamic batch
        names = self.meta.get("names") or {}
        self.names = {int(k): str(v) for k, v in (names.items() if isinstance(names, dict) else enumerate(names))}
        args = self.meta.get("args") or {}
        self.rows = bool(self.meta.get("end2end")) or bool(args.get("nms"))
        self.times = {"preprocess": 0.0, "inference": 0.0, "postprocess": 0.0}  # ms of the last call

    def preprocess(self, images: list[np.ndarray]):
        """BGR HWC uint8 images -> (B, 3, H, W) blob and per-image (shape, gain, pad)."""
        blobs, metas = [], []
        for im in images:
            lb, gain, pad = letterbox(im, self.imgsz)
            blobs.append(lb[..., ::-1].transpose(2, 0, 1))
            metas.append((im.shape[:2], gain, pad))
        blob = np.ascontiguousarray(np.stack(blobs)).astype(self.dtype) / self.dtype(255.0)
        return blob, metas

    def infer(self, blob: np.ndarray) -> np.ndarray:
        """Raw model output for a batch, run in chunks of the model's static batch size (last chunk padded)."""
        b = self.batch or len(blob)
        outs = []
        for i in range(0, len(blob), b):
            chunk = blob[i : i + b]
            n = len(chunk)
            if n < b:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, 0)])
            outs.append(self.session.run(None, {self.input_name: chunk})[0][:n].astype(np.float32))
        return np.concatenate(outs)

    def postprocess(self, y: np.ndarray, metas) -> list[np.ndarray]:
        """Raw outputs -> per image (N, 6) detections in original-image pixels."""
        out = []
        for yi, (shape, gain, pad) in zip(y, metas):
            if self.rows:
                det = decode_rows(yi, self.conf, self.max_det, self.classes)
            else:
                det = decode_dense(yi, self.conf, self.iou, self.max_det, self.classes, self.agnostic)
            det[:, :4] = scale_boxes(det[:, :4], gain, pad, shape)
            out.append(det)
        return out

    def __call__(self, images: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
        """Detect objects in one BGR image or a list of them; timings of the call land in `self.times` (ms)."""
        images = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
        t0 = time.perf_counter()
        blob, metas = self.preprocess(images)
        t1 = time.perf_counter()
        y = self.infer(blob)
        t2 = time.perf_counter()
        dets = self.postprocess(y, metas)
        t3 = time.perf_counter()
        self.times = {"preprocess": 1e3 * (t1 - t0), "inference": 1e3 * (t2 - t1), "postprocess": 1e3 * (t3 - t2)}
        return dets

    def records(self, det: np.ndarray) -> list[dict[str, Any]]:
        """Detections as JSON-ready dicts: class_id, name, confidence, box_xyxy (original-image pixels)."""
        return [
            {"class_id": int(c), "name": self.names.get(int(c), str(int(c))), "confidence": round(float(s), 5),
             "box_xyxy": [round(float(v), 2) for v in box]}
            for *box, s, c in det.tolist()
        ]


def color(class_id: int) -> tuple[int, int, int]:
    """A fixed, distinct BGR colour per class (golden-ratio hue walk)."""
    hue = int((class_id * 0.618033988749895 % 1.0) * 179)
    bgr = cv2.cvtColor(np.uint8([[[hue, 200, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def draw(img: np.ndarray, det: np.ndarray, names: dict[int, str]) -> np.ndarray:
    """A copy of `img` with each detection's box and 'name score' label drawn (OpenCV's built-in font)."""
    out = img.copy()
    lw = max(1, round(sum(img.shape[:2]) / 600))
    for *box, score, cls in det.tolist():
        c = color(int(cls))
        p1, p2 = (int(box[0]), int(box[1])), (int(box[2]), int(box[3]))
        cv2.rectangle(out, p1, p2, c, lw, cv2.LINE_AA)
        label = f"{names.get(int(cls), int(cls))} {score:.2f}"
        scale = lw / 3
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, max(lw - 1, 1))
        top = p1[1] - th - 3 >= 0
        q = (p1[0] + tw, p1[1] - th - 3 if top else p1[1] + th + 3)
        cv2.rectangle(out, p1, q, c, -1, cv2.LINE_AA)
        org = (p1[0], p1[1] - 2 if top else p1[1] + th + 2)
        cv2.putText(out, label, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), max(lw - 1, 1), cv2.LINE_AA)
    return out
