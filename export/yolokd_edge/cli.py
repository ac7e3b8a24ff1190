"""`python -m yolokd_edge MODEL.onnx source=... [key=value ...]` (also installed as `yolokd-edge`).

Keys (Ultralytics-style `key=value`):
  source=    image file, folder of images, video file, glob pattern, or a camera index (0)   (required)
  conf=0.25  confidence threshold           iou=0.7   NMS IoU threshold (dense outputs only)
  max_det=300                               classes=  class ids to keep, e.g. classes=0,2
  agnostic=False  class-agnostic NMS        device=auto  auto | cpu | cuda | tensorrt (ONNX Runtime provider)
  fp16=False      TensorRT: FP16 kernels    trt_cache=   TensorRT: folder caching built engines between runs
  out=edge_out    output folder             save=True  annotated images / video
  save_json=True  detections.json (images) or <video>.jsonl (one line per frame)
  quiet=False     no per-image lines

Exit codes: 0 done, 2 bad arguments or unreadable source.
"""

from __future__ import annotations

import ast
import glob
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

from yolokd_edge.runtime import EdgeDetector, draw

IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm", ".heic"}
VIDEO_SUFFIXES = {".asf", ".avi", ".gif", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".ts", ".wmv", ".webm"}
DEFAULTS: dict[str, Any] = dict(
    source=None, conf=0.25, iou=0.7, max_det=300, classes=None, agnostic=False, device="auto", fp16=False,
    trt_cache=None, out="edge_out", save=True, save_json=True, quiet=False,
)


def parse_args(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """`["m.onnx", "conf=0.3", "classes=0,2"]` -> ("m.onnx", {defaults..., "conf": 0.3, "classes": [0, 2]})."""
    model, args = None, dict(DEFAULTS)
    for a in argv:
        if "=" not in a:
            if model is not None:
                raise SystemExit(f"yolokd-edge: unexpected argument '{a}' (use key=value, e.g. conf=0.3)")
            model = a
            continue
        k, v = a.split("=", 1)
        k = k.strip().lstrip("-").replace("-", "_")
        if k == "model":
            model = v
            continue
        if k not in DEFAULTS:
            raise SystemExit(f"yolokd-edge: unknown key '{k}'. Valid keys: model, {', '.join(DEFAULTS)}")
        args[k] = _value(v)
    if model is None or args["source"] is None:
        raise SystemExit("yolokd-edge: usage: python -m yolokd_edge MODEL.onnx source=PATH [conf=0.25 ...]")
    if args["classes"] is not None:
        c = args["classes"]
        args["classes"] = [int(x) for x in (c if isinstance(c, (list, tuple)) else str(c).split(","))]
    return model, args


def _value(v: str) -> Any:
    if v.lower() in {"true", "false", "none"}:
        return {"true": True, "false": False, "none": None}[v.lower()]
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def iter_images(source: str) -> Iterator[tuple[str, np.ndarray]]:
    """(path, BGR image) for an image file, a folder (sorted) or a glob pattern."""
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(source) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images found at '{source}'")
    for f in files:
        im = cv2.imread(str(f))
        if im is None:
            print(f"yolokd-edge: skipping unreadable image {f}", file=sys.stderr)
            continue
        yield str(f), im


def is_video(source: str) -> bool:
    """True for a camera index or a file with a video suffix."""
    return str(source).isdigit() or Path(str(source)).suffix.lower() in VIDEO_SUFFIXES


def summary(det: np.ndarray, names: dict[int, str]) -> str:
    """'2 circle, 1 star' for a (N, 6) detection array."""
    if not len(det):
        return "no detections"
    ids, counts = np.unique(det[:, 5].astype(int), return_counts=True)
    return ", ".join(f"{n} {names.get(int(i), int(i))}" for i, n in zip(ids, counts))


def run_images(det: EdgeDetector, args: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Detect on every image of `source`; write annotated copies and detections.json under `out`."""
    results = []
    for path, im in iter_images(str(args["source"])):
        d = det(im)[0]
        results.append({"source": path, "height": im.shape[0], "width": im.shape[1],
                        "ms": {k: round(v, 2) for k, v in det.times.items()}, "detections": det.records(d)})
        if args["save"]:
            cv2.imwrite(str(out / (Path(path).stem + ".jpg")), draw(im, d, det.names))
        if not args["quiet"]:
            print(f"{path}: {summary(d, det.names)} ({det.times['inference']:.1f} ms inference)")
    if args["save_json"]:
        (out / "detections.json").write_text(json.dumps(results, indent=1))
    return results


def run_video(det: EdgeDetector, args: dict[str, Any], out: Path) -> int:
    """Detect on every frame of a video file or camera; write <name>.mp4 and <name>.jsonl under `out`."""
    src = str(args["source"])
    cap = cv2.VideoCapture(int(src) if src.isdigit() else src)
    if not cap.isOpened():
        raise FileNotFoundError(f"cannot open video source '{src}'")
    stem = f"camera{src}" if src.isdigit() else Path(src).stem
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    writer, jsonl, n, t0 = None, None, 0, time.perf_counter()
    if args["save_json"]:
        jsonl = open(out / f"{stem}.jsonl", "w")
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            d = det(frame)[0]
            if args["save"]:
                if writer is None:
                    h, w = frame.shape[:2]
                    writer = cv2.VideoWriter(str(out / f"{stem}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                writer.write(draw(frame, d, det.names))
            if jsonl is not None:
                jsonl.write(json.dumps({"frame": n, "detections": det.records(d)}) + "\n")
            if not args["quiet"]:
                print(f"{stem} frame {n}: {summary(d, det.names)} ({det.times['inference']:.1f} ms inference)")
            n += 1
    finally:
        cap.release()
        if writer is not None:
            writer.release()
        if jsonl is not None:
            jsonl.close()
    dt = time.perf_counter() - t0
    print(f"{stem}: {n} frames, {n / dt if dt else 0:.1f} frames/s end to end")
    return n


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m yolokd_edge`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(__doc__)
        return 0
    try:
        model, args = parse_args(argv)
        if not Path(model).is_file():
            raise FileNotFoundError(f"model '{model}' not found (pass the .onnx file written by `yolokd export`)")
        det = EdgeDetector(model, device=args["device"], conf=args["conf"], iou=args["iou"],
                           max_det=args["max_det"], classes=args["classes"], agnostic=args["agnostic"],
                           fp16=args["fp16"], trt_cache=args["trt_cache"])
        out = Path(args["out"])
        out.mkdir(parents=True, exist_ok=True)
        if not args["quiet"]:
            print(f"{model}: input {det.imgsz[0]}x{det.imgsz[1]}, {len(det.names)} classes, "
                  f"{'end-to-end rows' if det.rows else 'dense output + NMS'}, providers {det.providers}")
        if is_video(str(args["source"])):
            run_video(det, args, out)
        else:
            run_images(det, args, out)
        if not args["quiet"]:
            print(f"results in {out}/")
        return 0
    except (FileNotFoundError, ValueError) as e:
        print(f"yolokd-edge: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise


def entrypoint() -> None:
    """Console script `yolokd-edge`."""
    sys.exit(main())
