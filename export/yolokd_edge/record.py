"""Record what the edge runtime computes on given images: the ONNX side of `yolokd export`'s parity check.

    python -m yolokd_edge.record MODEL.onnx IMAGES.npz OUT.npz

IMAGES.npz holds `image0`, `image1`, ... (BGR uint8) and the scalars `conf` and `iou`. The images go through
`EdgeDetector` on CPU exactly as in deployment; OUT.npz receives

- `raw`: the model output for the letterboxed batch (float32);
- `det0`, `det1`, ...: per image (N, 6) = x1, y1, x2, y2, score, class in original-image pixels;
- `info`: JSON with the ONNX metadata (`meta`), the input tensor type (`input_type`), the output layout (`rows`),
  the input size (`imgsz`), the providers, where yolokd_edge was imported from (`edge_file`) and whether this process
  ran without torch and Ultralytics (`torch_free`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

import yolokd_edge
from yolokd_edge.runtime import EdgeDetector

FORBIDDEN = ("torch", "ultralytics")  # what a device install does not have


def torch_free() -> bool:
    """True when neither torch nor Ultralytics (nor any of their submodules) is imported in this process."""
    return not any(mod is not None and name.split(".")[0] in FORBIDDEN for name, mod in sys.modules.items())


def record(model: str | Path, images: list[np.ndarray], conf: float, iou: float) -> dict[str, Any]:
    """Raw output, detections and run facts of `EdgeDetector(model)` on `images` (see module docstring)."""
    det = EdgeDetector(model, device="cpu", conf=conf, iou=iou)
    blob, metas = det.preprocess(images)
    raw = det.infer(blob)
    dets = det.postprocess(raw, metas)
    info = {"meta": det.meta, "input_type": det.session.get_inputs()[0].type, "rows": det.rows,
            "imgsz": list(det.imgsz), "providers": det.providers, "edge_file": yolokd_edge.__file__,
            "torch_free": torch_free()}
    return {"raw": raw, **{f"det{i}": d for i, d in enumerate(dets)}, "info": np.array(json.dumps(info, default=str))}


def main(argv: list[str] | None = None) -> int:
    """`MODEL.onnx IMAGES.npz OUT.npz` -> writes OUT.npz; returns the exit code (2: bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 3:
        print(__doc__)
        return 0 if argv[:1] in (["help"], ["-h"], ["--help"]) else 2
    model, src, dst = argv
    with np.load(src) as f:
        images = [f[f"image{i}"] for i in range(sum(k.startswith("image") for k in f.files))]
        conf, iou = float(f["conf"]), float(f["iou"])
    np.savez(dst, **record(model, images, conf, iou))
    return 0


if __name__ == "__main__":
    sys.exit(main())
