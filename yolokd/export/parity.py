"""Does an exported student compute what its checkpoint does? Run both on the same images and compare.

The reference is Ultralytics' predict path on the PyTorch model: its letterbox, the fused model in the head mode of
the export, its NMS (or the confidence filter of end-to-end heads), boxes scaled back to the original images.

- ONNX (`run_edge`): the exported file runs through the edge runtime `yolokd_edge` (the code that ships to
  devices: its letterbox, ONNX Runtime on CPU, its decoding and NMS) in a separate process where torch and
  Ultralytics cannot be imported, and comes back as raw outputs and detections.
- TensorRT (`run_engine`): the .engine runs through Ultralytics' AutoBackend on the reference's input batch and
  Ultralytics' post-processing (needs an NVIDIA GPU and the `tensorrt` package).

`export_parity` runs either and `compare` reports
- raw outputs: max |export - PyTorch| (boxes in input pixels, scores in [0, 1]);
- detections: the share matched one-to-one (IoU > 0.5, same class) and the largest box-corner deviation of a match
  (original-image pixels).
A mismatch beyond tolerance fails. A check that compared nothing fails too: with no detection above `conf` on either
side, it passes only when the raw outputs were compared within tolerance, and says that no detection was matched.

End-to-end outputs (YOLO26 exported with `nms=False`, or any model with `nms=True`) are rows (B, K, 6) =
(x1, y1, x2, y2, score, class) sorted by score: rows whose scores tie may come out in a different order from the
two runtimes, so their raw difference is taken row-to-nearest-row (same class, L-inf over box and score) for the
PyTorch rows above the confidence threshold, instead of position by position.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROW_FORMATS_NOTE = "rows (B, K, 6): x1, y1, x2, y2, score, class"
DEFAULT_TOL = {  # (atol on raw outputs, minimum matched share of detections), per precision of the exported file
    "fp32": (1e-2, 0.99),
    "fp16": (1.0, 0.90),
    "int8": (None, 0.50),  # raw values move by design under INT8: only the detections are held to a bound
}
# The ONNX side runs in a fresh interpreter that cannot import torch or Ultralytics: what is checked is what ships.
EDGE_PROCESS = (
    "import sys\n"
    "sys.modules['torch'] = sys.modules['ultralytics'] = None\n"
    "from yolokd_edge.record import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
NOTHING_COMPARED = "pass parity_conf= lower (e.g. 0.01) to compare low-score boxes, or parity=False to skip the check"


class ParityError(RuntimeError):
    """The exported model's outputs differ from the checkpoint's beyond tolerance, or could not be compared."""


def parity_images(data: str | None, n: int = 8, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """Up to `n` validation images of dataset `data` (a YAML the checkpoint was trained on), else seeded noise.

    Returns:
        (images as BGR uint8 arrays, a short description of where they came from).
    """
    import cv2

    if data and str(data).endswith((".yaml", ".yml")) and Path(data).is_file():
        try:
            from ultralytics.data.utils import IMG_FORMATS, check_det_dataset

            info = check_det_dataset(str(data), autodownload=False)
            val = info.get("val") or info.get("test")
            roots = val if isinstance(val, list) else [val]
            files = sorted(
                f for r in roots if r for f in Path(r).rglob("*") if f.suffix[1:].lower() in IMG_FORMATS
            )[:n]
            images = [im for im in (cv2.imread(str(f)) for f in files) if im is not None]
            if images:
                return images, f"{len(images)} val images of {data}"
        except Exception:  # missing images, offline download needed, ...: fall back to noise
            pass
    rng = np.random.default_rng(seed)
    sizes = [(480, 640), (640, 480), (320, 320), (360, 500)]  # non-square too, so letterbox padding is exercised
    images = [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]
    return images, f"{n} random noise images (no dataset found in the checkpoint's train args)"


def precision_of(args: dict[str, Any], input_type: str = "") -> str:
    """'fp32', 'fp16' or 'int8' for an export's Ultralytics args (`quantize`) and its input tensor type."""
    q = args.get("quantize")
    if q in (8, "int8") or str(q).startswith("w8"):
        return "int8"
    return "fp16" if q in (16, "fp16") or "float16" in input_type else "fp32"


def to_batch(images: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """BGR HWC uint8 images -> letterboxed RGB BCHW float32 in [0, 1], with Ultralytics' predict-time LetterBox."""
    from ultralytics.data.augment import LetterBox

    letterbox = LetterBox(shape, auto=False)
    out = np.stack([letterbox(image=im)[..., ::-1].transpose(2, 0, 1) for im in images])
    return np.ascontiguousarray(out, dtype=np.float32) / 255.0


def ultralytics_detections(y: np.ndarray, rows: bool, conf: float, iou: float) -> list[np.ndarray]:
    """Ultralytics' own NMS / end-to-end filter on a raw output -> per image (N, 6) xyxy, score, class (input px)."""
    import torch
    import torchvision  # noqa: F401  (Ultralytics uses torchvision's NMS once it is imported)

    from ultralytics.utils.nms import non_max_suppression

    return [d.numpy() for d in non_max_suppression(torch.from_numpy(y), conf, iou, max_det=300, end2end=rows)]


def to_original(dets: list[np.ndarray], shape: tuple[int, int], images: list[np.ndarray]) -> list[np.ndarray]:
    """Detections in letterboxed-input pixels -> original-image pixels, with Ultralytics' `scale_boxes` (clipped)."""
    from ultralytics.utils.ops import scale_boxes

    out = []
    for d, im in zip(dets, images):
        d = d.copy()
        d[:, :4] = scale_boxes(shape, d[:, :4].copy(), im.shape[:2])
        out.append(d)
    return out


def torch_outputs(model, x: np.ndarray, end2end: bool) -> np.ndarray:
    """The model's inference output on batch `x`, fused as Ultralytics predicts, in the head mode of the export."""
    from copy import deepcopy

    import torch

    model = deepcopy(model).float().eval()
    if hasattr(model, "end2end"):
        model.end2end = end2end  # before fusing: fusion drops the head branch that is not selected
    model = model.fuse(verbose=False) if hasattr(model, "fuse") else model
    with torch.inference_mode():
        y = model(torch.from_numpy(x))
    return (y[0] if isinstance(y, (list, tuple)) else y).float().numpy()


def run_edge(onnx_path: str | Path, images: list[np.ndarray], conf: float, iou: float) -> dict[str, Any]:
    """Run `onnx_path` through `yolokd_edge` (ONNX Runtime CPU) in a process without torch (see `EDGE_PROCESS`).

    Returns:
        What `check_against_torch` compares: `raw` (model output of the letterboxed batch), `dets` (per image
        (N, 6), original-image pixels), `rows`, `shape`, `end2end`, `precision`, `side`; plus `edge`: how the edge
        runtime ran (`torch_free`, `edge_file`, `providers`; see yolokd_edge.record).

    Raises:
        ParityError: the edge runtime failed (its last error line is quoted).
    """
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "images.npz", Path(tmp) / "edge.npz"
        np.savez(src, conf=conf, iou=iou, **{f"image{i}": im for i, im in enumerate(images)})
        run = subprocess.run([sys.executable, "-c", EDGE_PROCESS, str(Path(onnx_path).resolve()), str(src), str(dst)],
                             cwd=tmp, capture_output=True, text=True)
        if run.returncode:
            last = (run.stderr.strip().splitlines() or ["no error output"])[-1]
            raise ParityError(f"the edge runtime yolokd_edge failed on {onnx_path}: {last}")
        with np.load(dst) as f:
            raw, dets, info = f["raw"], [f[f"det{i}"] for i in range(len(images))], json.loads(str(f["info"]))
    meta = info["meta"]
    return {"raw": raw, "dets": dets, "rows": info["rows"], "shape": tuple(info["imgsz"]),
            "end2end": bool(meta.get("end2end", False)), "side": "ONNX",
            "precision": precision_of(meta.get("args") or {}, info["input_type"]),
            "edge": {k: info[k] for k in ("torch_free", "edge_file", "providers")}}


def run_engine(engine_path: str | Path, images: list[np.ndarray], conf: float, iou: float) -> dict[str, Any]:
    """Run a TensorRT engine through Ultralytics' AutoBackend (CUDA) and Ultralytics' post-processing.

    Returns:
        What `check_against_torch` compares, as `run_edge` returns it (without `edge`).
    """
    import torch

    from ultralytics.nn.autobackend import AutoBackend

    backend = AutoBackend(str(engine_path), device=torch.device("cuda:0"), verbose=False)
    meta = backend.metadata
    imgsz = meta.get("imgsz") or 640
    shape = (imgsz, imgsz) if isinstance(imgsz, int) else (int(imgsz[0]), int(imgsz[-1]))
    args, end2end = meta.get("args") or {}, bool(meta.get("end2end", False))
    with torch.inference_mode():
        y = backend(torch.from_numpy(to_batch(images, shape)).cuda())
    y = (y[0] if isinstance(y, (list, tuple)) else y).float().cpu().numpy()
    rows = y.ndim == 3 and y.shape[-1] == 6 and (end2end or bool(args.get("nms")))
    dets = to_original(ultralytics_detections(y, rows, conf, iou), shape, images)
    return {"raw": y, "dets": dets, "rows": rows, "shape": shape, "end2end": end2end, "side": "TensorRT",
            "precision": precision_of(args)}


def match_detections(a: np.ndarray, b: np.ndarray, iou_thr: float = 0.5) -> tuple[int, float]:
    """Greedy one-to-one matching of two (N, 6) detection sets by IoU (> iou_thr) within the same class.

    Pairs whose corners all agree within 0.5 px count as IoU 1 (see below).

    Returns:
        (number of matched pairs, largest |corner difference| in px over the matched pairs, 0 if none).
    """
    if not len(a) or not len(b):
        return 0, 0.0
    import torch

    from ultralytics.utils.metrics import box_iou

    iou = box_iou(torch.from_numpy(a[:, :4]).float(), torch.from_numpy(b[:, :4]).float()).numpy()
    # Boxes equal to half a pixel count as IoU 1: IoU is undefined for the zero-area or inverted boxes that an
    # untrained head can output, and such a box is still reproduced by the export.
    iou[np.abs(a[:, None, :4] - b[None, :, :4]).max(-1) <= 0.5] = 1.0
    iou[a[:, None, 5] != b[None, :, 5]] = 0.0
    matched, dev = 0, 0.0
    used_a, used_b = set(), set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):  # greedy on IoU, best pairs first
        i, j = np.unravel_index(flat, iou.shape)
        if iou[i, j] <= iou_thr:
            break
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        matched += 1
        dev = max(dev, float(np.abs(a[i, :4] - b[j, :4]).max()))
    return matched, dev


def rows_diff(t: np.ndarray, o: np.ndarray, conf: float) -> float:
    """Order-independent raw difference of row outputs: each PyTorch row above `conf` to its nearest exported row."""
    worst = 0.0
    for ti, oi in zip(t, o):
        keep = ti[ti[:, 4] > conf]
        for row in keep:
            same = oi[oi[:, 5] == row[5]]
            near = np.abs(same[:, :5] - row[:5]).max(1).min() if len(same) else np.inf
            worst = max(worst, float(near))
    return worst


def compare(
    y_torch: np.ndarray,
    y_export: np.ndarray,
    det_torch: list[np.ndarray],
    det_export: list[np.ndarray],
    rows: bool,
    precision: str,
    conf: float,
    atol: float | None = None,
    min_match: float | None = None,
    side: str = "ONNX",
) -> dict[str, Any]:
    """Raw outputs and detections of an export against PyTorch's -> report (see module docstring).

    Returns:
        `max_abs_diff`, `max_abs_diff_boxes` / `max_abs_diff_scores` (dense outputs only), `raw_compared` (values or
        rows compared), `matched`, `total` (detections of the larger side, summed over images), `match_rate` (None
        when there was no detection), `max_box_dev_px`, `precision`, `layout`, `side`, `conf`, `atol`, `min_match`,
        `passed`, `failures` (list of str) and `note` (what was not compared, or '').
    """
    d_atol, d_match = DEFAULT_TOL[precision]
    atol = d_atol if atol is None else atol
    min_match = d_match if min_match is None else min_match
    report: dict[str, Any] = {"precision": precision, "side": side, "conf": conf, "atol": atol, "min_match": min_match,
                              "layout": ROW_FORMATS_NOTE if rows else f"dense {tuple(y_export.shape)}"}
    if rows:
        report.update(max_abs_diff=rows_diff(y_torch, y_export, conf), raw_compared=int((y_torch[..., 4] > conf).sum()))
    else:
        if y_export.shape != y_torch.shape:
            raise ParityError(f"{side} output {y_export.shape} and PyTorch output {y_torch.shape} differ in shape")
        diff = np.abs(y_export - y_torch)
        report.update(max_abs_diff=float(diff.max()), max_abs_diff_boxes=float(diff[:, :4].max()),
                      max_abs_diff_scores=float(diff[:, 4:].max()), raw_compared=int(diff.size))
    matched = total = 0
    dev = 0.0
    for a, b in zip(det_torch, det_export):
        m, d = match_detections(a, b)
        matched, total, dev = matched + m, total + max(len(a), len(b)), max(dev, d)
    report.update(matched=matched, total=total, match_rate=matched / total if total else None, max_box_dev_px=dev)

    raw_checked = atol is not None and report["raw_compared"] > 0
    failures, note = [], ""
    if raw_checked and not report["max_abs_diff"] <= atol:
        failures.append(f"max |{side} - PyTorch| = {report['max_abs_diff']:.3g} > atol {atol:g}")
    if total and report["match_rate"] < min_match:
        failures.append(f"matched detections {matched}/{total} = {report['match_rate']:.3f} < {min_match:g}")
    if not total and not raw_checked:
        why = "no raw row above it" if rows else "raw INT8 outputs have no tolerance"
        failures.append(f"nothing was compared: no detection above conf {conf} on either side, and {why}; "
                        f"{NOTHING_COMPARED}")
    elif not total:
        note = f"no detection above conf {conf} on either side, so no detection was matched: raw outputs only"
    report.update(passed=not failures, failures=failures, note=note)
    return report


def format_parity(r: dict[str, Any]) -> str:
    """One line of parity figures for the console."""
    side = r["side"]
    raw = f"max |{side} - PyTorch| {r['max_abs_diff']:.3g}" if r["raw_compared"] else "raw outputs not compared"
    if "max_abs_diff_boxes" in r:
        raw += f" (boxes {r['max_abs_diff_boxes']:.3g} px, scores {r['max_abs_diff_scores']:.3g})"
    if r["total"]:
        dets = (f"detections matched {r['matched']}/{r['total']} ({100 * r['match_rate']:.1f}%), max box deviation "
                f"{r['max_box_dev_px']:.3g} px")
    else:
        dets = f"detections matched 0/0 (none above conf {r['conf']} on either side)"
    verdict = "FAILED: " + "; ".join(r["failures"]) if not r["passed"] else "PASSED"
    if r["passed"] and not r["total"]:
        verdict += " on raw outputs only (no detection was matched)"
    where = f"{r['n_images']} images at {r['imgsz'][0]}x{r['imgsz'][1]}, {r['layout']}"
    return f"parity of {side} ({r['precision']}, {where}): {raw}; {dets} -> {verdict}"


def check_against_torch(model, images: list[np.ndarray], export: dict[str, Any], conf: float, iou: float,
                        atol: float | None, min_match: float | None) -> dict[str, Any]:
    """Run the PyTorch reference (module docstring) on `images` and `compare` the export's outputs with it.

    Args:
        export: What the exported file gave, from `run_edge` or `run_engine`.
    """
    shape, end2end, rows, y_export = export["shape"], export["end2end"], export["rows"], export["raw"]
    y_torch = torch_outputs(model, to_batch(images, shape), end2end)
    det_torch = ultralytics_detections(y_torch, end2end, conf, iou)
    if rows and not end2end:  # NMS inside the exported graph: its rows are the checkpoint's NMS-ed detections
        k = y_export.shape[1]
        y_torch = np.stack([np.pad(d, ((0, max(0, k - len(d))), (0, 0)))[:k] for d in det_torch])
    report = compare(y_torch, y_export, to_original(det_torch, shape, images), export["dets"], rows,
                     export["precision"], conf, atol, min_match, export["side"])
    report.update(n_images=len(images), imgsz=list(shape))
    if "edge" in export:
        report["edge"] = export["edge"]
    return report


def export_parity(
    model,
    exported: str | Path,
    images: list[np.ndarray] | None = None,
    atol: float | None = None,
    min_match: float | None = None,
    conf: float = 0.25,
    iou: float = 0.7,
) -> dict[str, Any]:
    """Compare an exported file with the PyTorch model on the same images (module docstring): an .engine through
    `run_engine` (NVIDIA GPU), anything else as ONNX through the edge runtime (`run_edge`).

    Args:
        model: The student: checkpoint path (loaded once and safely, with `load_yolo`) or its loaded model.
        exported: Its ONNX export or TensorRT engine.
        images: BGR uint8 images; default `parity_images` of the dataset the model was trained on.
        atol: Largest allowed raw difference; default by precision (fp32 1e-2, fp16 1.0, int8 unchecked).
        min_match: Smallest allowed share of matched detections; default by precision (0.99 / 0.90 / 0.50).
        conf: Confidence threshold of the detections compared.
        iou: NMS IoU threshold.

    Returns:
        `compare`'s report plus `n_images`, `imgsz` and, for ONNX, `edge` (how the edge runtime ran).
    """
    if isinstance(model, (str, Path)):
        from yolokd.export.safety import load_yolo

        model = load_yolo(model).model
    if images is None:
        images, _ = parity_images((getattr(model, "args", None) or {}).get("data"))
    run = run_engine if Path(exported).suffix == ".engine" else run_edge
    return check_against_torch(model, images, run(exported, images, conf, iou), conf, iou, atol, min_match)
