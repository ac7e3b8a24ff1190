"""Export a distilled student for deployment, and check that the exported file computes what the checkpoint does.

    yolokd export model=runs/detect/student/weights/best.pt format=onnx imgsz=640
    yolokd export model=best.pt format=engine quantize=16          # TensorRT, on a machine with an NVIDIA GPU

The export itself is Ultralytics' exporter (`YOLO(pt).export(...)`, every Ultralytics export argument works).
yolokd adds two checks around it:

1. Before: `check_clean_student` proves the checkpoint is a plain student. It reads the pickle's GLOBAL opcodes
   (pickletools, no unpickling) and refuses any class outside ultralytics/torch/numpy/collections/builtins (a
   yolokd hook, adapter or loss saved by mistake would make `YOLO("best.pt")` fail for users without yolokd).
   Only then is the checkpoint unpickled, to refuse a teacher or distillation wrapper (Ultralytics' own
   `DistillationModel` is an Ultralytics class, so the scan alone cannot see it) and forward hooks left behind.
2. After an ONNX export (or the ONNX intermediate of a TensorRT export): `onnx_parity` runs ONNX Runtime and the
   PyTorch checkpoint on the same letterboxed images and compares
   - raw outputs: max |ONNX - PyTorch| (boxes in input pixels, scores in [0, 1]);
   - detections after Ultralytics' own post-processing (NMS, or the confidence filter of end-to-end heads):
     the share matched one-to-one (IoU > 0.5, same class) and the largest box-corner deviation of a match (px).
   A mismatch beyond tolerance fails the export (exit code 1).

End-to-end outputs (YOLO26 exported with `nms=False`, or any model with `nms=True`) are rows (B, K, 6) =
(x1, y1, x2, y2, score, class) sorted by score: rows whose scores tie may come out in a different order from the
two runtimes, so their raw difference is taken row-to-nearest-row (same class, L-inf over box and score) for the
PyTorch rows above the confidence threshold, instead of position by position.
"""

from __future__ import annotations

import importlib.util
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from yolokd.config import DistillationConfigError

# Top-level packages a plain Ultralytics student checkpoint may reference. `__builtin__` is how pickle protocol 2
# (torch.save's default) spells `builtins`; `_codecs` and `copyreg` are pickle's own helpers (numpy scalars,
# `__reduce_ex__` objects) and construct nothing but what another, also scanned, GLOBAL names.
ALLOWED_PICKLE_PACKAGES = frozenset(
    {"ultralytics", "torch", "collections", "builtins", "__builtin__", "numpy", "_codecs", "copyreg"}
)
# Attribute-name fragments that betray distillation state inside a model (teacher, adapters, wrappers).
DISTILL_ATTRS = ("teacher", "student_model", "distill", "adapter", "kd_")

ROW_FORMATS_NOTE = "rows (B, K, 6): x1, y1, x2, y2, score, class"
DEFAULT_TOL = {  # (atol on raw outputs, minimum matched share of detections), per precision of the exported file
    "fp32": (1e-2, 0.99),
    "fp16": (1.0, 0.90),
    "int8": (None, 0.50),  # raw values move by design under INT8: only the detections are held to a bound
}


class ParityError(RuntimeError):
    """The exported model's outputs differ from the checkpoint's beyond tolerance."""


# --------------------------------------------------------------------------------------------- clean student
def pickled_globals(path: str | Path) -> set[str]:
    """Every `module.name` a torch zip checkpoint's pickle references, read from its opcodes without unpickling.

    Args:
        path: A checkpoint written by `torch.save` (zip format, torch >= 1.6).

    Returns:
        The set of referenced globals, e.g. {"ultralytics.nn.tasks.DetectionModel", "collections.OrderedDict"}.
    """
    try:
        with zipfile.ZipFile(path) as z:
            blobs = [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
    except zipfile.BadZipFile as e:
        raise DistillationConfigError(
            f"'{path}' is not a torch zip checkpoint (legacy torch<1.6 format or not a .pt file): re-save it with a "
            f"recent torch, or pass the best.pt/last.pt of a training run."
        ) from e
    found: set[str] = set()
    for blob in blobs:
        pushed: list[Any] = []  # values pushed so far (strings, None for anything else): STACK_GLOBAL reads two
        memo: dict[int, Any] = {}
        for op, arg, _ in pickletools.genops(blob):
            name = op.name
            if name == "GLOBAL":  # protocol <= 3: arg is "module name"
                found.add(".".join(str(arg).split(" ", 1)))
                pushed.append(None)
            elif name == "STACK_GLOBAL":  # protocol >= 4: module and name are the two values below
                module, qual = (pushed[-2:] + [None, None])[:2] if len(pushed) >= 2 else (None, None)
                found.add(f"{module}.{qual}" if isinstance(module, str) and isinstance(qual, str) else "<unknown>")
                pushed.append(None)
            elif name in {"SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING",
                          "BINSTRING", "STRING"}:
                pushed.append(arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in {"BINPUT", "LONG_BINPUT", "PUT"}:
                memo[int(arg)] = pushed[-1] if pushed else None
            elif name in {"BINGET", "LONG_BINGET", "GET"}:
                pushed.append(memo.get(int(arg)))
            elif op.stack_after:
                pushed.append(None)
    return found


def foreign_globals(path: str | Path) -> list[str]:
    """Globals of the checkpoint outside `ALLOWED_PICKLE_PACKAGES`, sorted."""
    return sorted(g for g in pickled_globals(path) if g.split(".", 1)[0] not in ALLOWED_PICKLE_PACKAGES)


def check_clean_student(path: str | Path) -> None:
    """Refuse a checkpoint that is not a plain Ultralytics student (see module docstring, check 1).

    Raises:
        FileNotFoundError: no such file.
        DistillationConfigError: foreign classes pickled, no model, a teacher/adapter/wrapper inside, or hooks.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"student checkpoint '{path}' not found")
    foreign = foreign_globals(path)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" (+{len(foreign) - 6} more)" if len(foreign) > 6 else "")
        raise DistillationConfigError(
            f"'{path}' is not a clean student checkpoint: its pickle references {shown}, outside "
            f"ultralytics/torch/numpy. Loading it would need that code (yolokd hooks, adapters or losses saved "
            f"with the model). Export the weights/best.pt written by DistillationTrainer, which holds the student "
            f"only, or load this file and re-save its plain model."
        )
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # safe: every global was checked above
    models = {k: ckpt.get(k) for k in ("model", "ema")} if isinstance(ckpt, dict) else {"model": ckpt}
    models = {k: m for k, m in models.items() if m is not None}
    if not models or not all(isinstance(m, torch.nn.Module) for m in models.values()):
        raise DistillationConfigError(f"'{path}' holds no model under 'model'/'ema': not an Ultralytics checkpoint.")
    for key, model in models.items():
        problems = _distillation_leftovers(model)
        if problems:
            raise DistillationConfigError(
                f"'{path}' is not a clean student checkpoint: ckpt['{key}'] has {'; '.join(problems[:4])}. Export "
                f"the plain student (weights/best.pt of a DistillationTrainer run); a model saved by Ultralytics' "
                f"own distillation (distill_model=) must be unwrapped to its student first."
            )


def _distillation_leftovers(model) -> list[str]:
    """Teacher/adapter/wrapper attributes and non-empty hook dicts anywhere in `model` (a torch module)."""
    found = []
    if "distill" in type(model).__name__.lower():
        found.append(f"a distillation wrapper class {type(model).__qualname__}")
    for mod_name, m in model.named_modules():
        where = mod_name or "<root>"
        for attr, value in vars(m).items():
            if value is not None and any(s in attr.lower() for s in DISTILL_ATTRS):
                found.append(f"attribute '{attr}' on {where}")
        for attr, value in m._modules.items():
            if value is not None and any(s in attr.lower() for s in DISTILL_ATTRS):
                found.append(f"submodule '{attr}' on {where}")
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks = getattr(m, kind, None)
            if hooks:
                found.append(f"{len(hooks)} {kind.strip('_').replace('_', ' ')} on {where}")
    return found


# --------------------------------------------------------------------------------------------- parity
def letterbox(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Ultralytics' predict-time letterbox (centred, grey 114 padding, no stride rounding) of an HWC BGR image."""
    from ultralytics.data.augment import LetterBox

    return LetterBox(shape, auto=False)(image=img)


def to_batch(images: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """BGR HWC uint8 images -> letterboxed RGB BCHW float32 in [0, 1], as Ultralytics preprocesses them."""
    out = np.stack([letterbox(im, shape)[..., ::-1].transpose(2, 0, 1) for im in images])
    return np.ascontiguousarray(out, dtype=np.float32) / 255.0


def parity_images(pt_path: str | Path, n: int = 8, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """Up to `n` validation images of the dataset the checkpoint was trained on, else seeded noise images.

    Returns:
        (images as BGR uint8 arrays, a short description of where they came from).
    """
    import cv2
    import torch

    data = None
    try:
        ckpt = torch.load(pt_path, map_location="cpu", weights_only=False)
        data = (ckpt.get("train_args") or {}).get("data")
    except Exception:
        pass
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


def onnx_metadata(onnx: str | Path | Any) -> dict[str, Any]:
    """Ultralytics' metadata of an exported ONNX file (path or ONNX Runtime session), values parsed."""
    import ast

    if isinstance(onnx, (str, Path)):
        import onnxruntime as ort

        onnx = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    out = {}
    for k, v in onnx.get_modelmeta().custom_metadata_map.items():
        try:
            out[k] = ast.literal_eval(v)  # names dict, imgsz list, args dict, bools
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _precision(meta: dict, input_type: str) -> str:
    q = (meta.get("args") or {}).get("quantize")
    if q in (8, "int8") or str(q).startswith("w8"):
        return "int8"
    return "fp16" if q in (16, "fp16") or "float16" in input_type else "fp32"


def _run_onnx(session, x: np.ndarray) -> np.ndarray:
    """Run `session` on batch `x`, in chunks of the model's static batch size (padded) when it has one."""
    inp = session.get_inputs()[0]
    dtype = np.float16 if "float16" in inp.type else np.float32
    b = inp.shape[0] if isinstance(inp.shape[0], int) else len(x)
    outs = []
    for i in range(0, len(x), b):
        chunk = x[i : i + b]
        pad = b - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
        y = session.run(None, {inp.name: chunk.astype(dtype)})[0]
        outs.append(y[: b - pad].astype(np.float32))
    return np.concatenate(outs)


def _run_torch(pt_path: str | Path, x: np.ndarray, end2end: bool) -> np.ndarray:
    """The checkpoint's inference output on `x`, fused as Ultralytics predicts, in the head mode of the export."""
    import torch

    from ultralytics.nn.tasks import load_checkpoint

    model, _ = load_checkpoint(pt_path)
    if hasattr(model, "end2end"):
        model.end2end = end2end  # before fusing: fusion drops the head branch that is not selected
    model = model.fuse(verbose=False) if hasattr(model, "fuse") else model
    with torch.inference_mode():
        y = model(torch.from_numpy(x))
    return (y[0] if isinstance(y, (list, tuple)) else y).float().numpy()


def _postprocess(y: np.ndarray, rows: bool, conf: float, iou: float) -> list[np.ndarray]:
    """Ultralytics' own NMS / end-to-end filter on a raw output -> per image (N, 6) xyxy, score, class."""
    import torch
    import torchvision  # noqa: F401  (Ultralytics uses torchvision's NMS once it is imported)

    from ultralytics.utils.nms import non_max_suppression

    return [d.numpy() for d in non_max_suppression(torch.from_numpy(y), conf, iou, max_det=300, end2end=rows)]


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


def _rows_diff(t: np.ndarray, o: np.ndarray, conf: float) -> float:
    """Order-independent raw difference of row outputs: each PyTorch row above `conf` to its nearest ONNX row."""
    worst = 0.0
    for ti, oi in zip(t, o):
        keep = ti[ti[:, 4] > conf]
        for row in keep:
            same = oi[oi[:, 5] == row[5]]
            near = np.abs(same[:, :5] - row[:5]).max(1).min() if len(same) else np.inf
            worst = max(worst, float(near))
    return worst


def onnx_parity(
    pt_path: str | Path,
    onnx_path: str | Path,
    images: list[np.ndarray] | None = None,
    imgsz: int | tuple[int, int] | None = None,
    atol: float | None = None,
    min_match: float | None = None,
    conf: float = 0.25,
    iou: float = 0.7,
) -> dict[str, Any]:
    """Compare ONNX Runtime against the PyTorch checkpoint on the same images (see module docstring, check 2).

    Args:
        pt_path: The student checkpoint.
        onnx_path: Its ONNX export.
        images: BGR uint8 images; default `parity_images(pt_path)`.
        imgsz: Input size (h, w) or int; default the ONNX metadata's `imgsz`.
        atol: Largest allowed raw difference; default by precision (fp32 1e-2, fp16 1.0, int8 unchecked).
        min_match: Smallest allowed share of matched detections; default by precision (0.99 / 0.90 / 0.50).
        conf: Confidence threshold of the detections compared.
        iou: NMS IoU threshold.

    Returns:
        Figures: `max_abs_diff`, `max_abs_diff_boxes`, `max_abs_diff_scores` (dense outputs only), `matched`,
        `total` (detections of the larger side, summed over images), `match_rate`, `max_box_dev_px`,
        `n_images`, `precision`, `layout`, `atol`, `min_match`, `passed` (bool) and `failures` (list of str).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = onnx_metadata(session)
    shape = imgsz or meta.get("imgsz") or session.get_inputs()[0].shape[2:]
    shape = (shape, shape) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if images is None:
        images, _ = parity_images(pt_path)
    x = to_batch(images, shape)
    y_onnx = _run_onnx(session, x)
    end2end = bool(meta.get("end2end", False))
    embedded_nms = bool((meta.get("args") or {}).get("nms"))
    rows = y_onnx.ndim == 3 and y_onnx.shape[-1] == 6 and (end2end or embedded_nms)
    y_torch = _run_torch(pt_path, x, end2end)

    precision = _precision(meta, session.get_inputs()[0].type)
    d_atol, d_match = DEFAULT_TOL[precision]
    atol = d_atol if atol is None else atol
    min_match = d_match if min_match is None else min_match

    det_o = _postprocess(y_onnx, rows, conf, iou)
    det_t = _postprocess(y_torch, end2end, conf, iou)
    if rows and not end2end:  # NMS inside the ONNX graph: compare with the checkpoint's NMS-ed detections
        k = y_onnx.shape[1]
        y_torch = np.stack([np.pad(d, ((0, max(0, k - len(d))), (0, 0)))[:k] for d in det_t])
    report: dict[str, Any] = {"n_images": len(images), "imgsz": list(shape), "precision": precision,
                              "layout": ROW_FORMATS_NOTE if rows else f"dense {tuple(y_onnx.shape)}"}
    if rows:
        report["max_abs_diff"] = _rows_diff(y_torch, y_onnx, conf)
    else:
        if y_onnx.shape != y_torch.shape:
            raise ParityError(f"ONNX output {y_onnx.shape} and PyTorch output {y_torch.shape} differ in shape")
        diff = np.abs(y_onnx - y_torch)
        report.update(max_abs_diff=float(diff.max()), max_abs_diff_boxes=float(diff[:, :4].max()),
                      max_abs_diff_scores=float(diff[:, 4:].max()))
    matched = total = 0
    dev = 0.0
    for a, b in zip(det_t, det_o):
        m, d = match_detections(a, b)
        matched, total, dev = matched + m, total + max(len(a), len(b)), max(dev, d)
    report.update(matched=matched, total=total, match_rate=matched / total if total else 1.0, max_box_dev_px=dev,
                  atol=atol, min_match=min_match)
    failures = []
    if atol is not None and not report["max_abs_diff"] <= atol:
        failures.append(f"max |ONNX - PyTorch| = {report['max_abs_diff']:.3g} > atol {atol:g}")
    if report["match_rate"] < min_match:
        failures.append(f"matched detections {matched}/{total} = {report['match_rate']:.3f} < {min_match:g}")
    report.update(passed=not failures, failures=failures)
    return report


def format_parity(r: dict[str, Any]) -> str:
    """One paragraph of parity figures for the console."""
    raw = f"max |ONNX - PyTorch| {r['max_abs_diff']:.3g}"
    if "max_abs_diff_boxes" in r:
        raw += f" (boxes {r['max_abs_diff_boxes']:.3g} px, scores {r['max_abs_diff_scores']:.3g})"
    verdict = "PASSED" if r["passed"] else "FAILED: " + "; ".join(r["failures"])
    return (
        f"parity ({r['precision']}, {r['n_images']} images at {r['imgsz'][0]}x{r['imgsz'][1]}, {r['layout']}): {raw}; "
        f"detections matched {r['matched']}/{r['total']} ({100 * r['match_rate']:.1f}%), max box deviation "
        f"{r['max_box_dev_px']:.3g} px -> {verdict}"
    )


# --------------------------------------------------------------------------------------------- export
def _is_engine(fmt: str) -> bool:
    return str(fmt).lower() in {"engine", "tensorrt", "trt"}


def check_tensorrt_available() -> None:
    """Refuse a TensorRT export up front where it cannot work (no CUDA GPU, or no `tensorrt` package)."""
    import torch

    if not torch.cuda.is_available():
        raise DistillationConfigError(
            "format=engine (TensorRT) needs an NVIDIA GPU with CUDA and the `tensorrt` package; this machine has no "
            "CUDA GPU visible to torch. Export ONNX here (format=onnx) and build the engine on the target device "
            "(e.g. `trtexec --onnx=model.onnx --saveEngine=model.engine --fp16`, or `yolokd export format=engine` "
            "there)."
        )
    from ultralytics.utils import AUTOINSTALL

    if importlib.util.find_spec("tensorrt") is None and not AUTOINSTALL:
        raise DistillationConfigError(
            "format=engine needs the `tensorrt` Python package (pip install tensorrt, or the JetPack one on Jetson); "
            "it is not installed and YOLO_AUTOINSTALL is off."
        )


def _train_args(pt_path: Path) -> dict[str, Any]:
    import torch

    try:
        return dict(torch.load(pt_path, map_location="cpu", weights_only=False).get("train_args") or {})
    except Exception:
        return {}


def export_student(
    model: str | Path,
    parity: bool = True,
    images: list[np.ndarray] | None = None,
    atol: float | None = None,
    min_match: float | None = None,
    **export_args: Any,
) -> Path:
    """Check, export and (for ONNX) verify a distilled student.

    Args:
        model: The student checkpoint (.pt).
        parity: Run `onnx_parity` after an ONNX / TensorRT export and raise `ParityError` on a mismatch.
        images: Parity images (BGR uint8); default `parity_images(model)`.
        atol: Raw-output tolerance of the parity check (default by precision, see `onnx_parity`).
        min_match: Matched-detection tolerance of the parity check (default by precision).
        **export_args: Ultralytics export arguments (format=onnx by default, imgsz, quantize/half/int8, dynamic,
            simplify, nms, batch, opset, device, ...).

    Returns:
        Path of the exported file (or folder, for folder formats such as OpenVINO).

    Raises:
        DistillationConfigError: not a clean student, or TensorRT requested where it cannot run.
        ParityError: the exported ONNX does not reproduce the checkpoint.
    """
    from ultralytics import YOLO
    from ultralytics.utils import LOGGER

    from yolokd.checks import resolve_weights

    path = resolve_weights(model, "student")
    check_clean_student(path)
    export_args.setdefault("format", "onnx")
    fmt = str(export_args["format"]).lower()
    if _is_engine(fmt):
        check_tensorrt_available()
    int8 = export_args.get("int8") or export_args.get("quantize") in (8, "int8")
    if int8 and not export_args.get("data"):  # calibrate on the student's own data, not Ultralytics' coco8 download
        data = _train_args(path).get("data")
        if data and Path(str(data)).is_file():
            export_args["data"] = data
    out = Path(YOLO(str(path)).export(**export_args))
    onnx_file = out if out.suffix == ".onnx" else out.with_suffix(".onnx") if _is_engine(fmt) else None
    if parity and onnx_file is not None and onnx_file.is_file():
        if images is None:
            images, source = parity_images(path)
            LOGGER.info(f"yolokd export: parity check on {source}")
        report = onnx_parity(path, onnx_file, images, atol=atol, min_match=min_match)
        LOGGER.info(f"yolokd export: {format_parity(report)}")
        if not report["passed"]:
            raise ParityError(f"{onnx_file} does not reproduce {path}: {'; '.join(report['failures'])}")
    elif parity and onnx_file is None:
        LOGGER.info(f"yolokd export: parity check runs on ONNX exports only; format={fmt} not checked.")
    return out


EXPORT_HELP = """\
yolokd export model=<student.pt> [format=onnx] [key=value ...]

Exports a distilled student with Ultralytics' exporter: every Ultralytics export argument works (format, imgsz,
quantize (or half/int8), dynamic, simplify, nms, batch, opset, device, data, ...; see `yolo cfg`). Defaults to
format=onnx. The checkpoint must be a clean student (ultralytics/torch classes only, no teacher, no hooks).
After an ONNX (or TensorRT) export, ONNX Runtime is compared with PyTorch on sample images; a mismatch exits 1.

yolokd's own keys:
  parity=True          run the ONNX parity check
  parity_atol=         largest raw |ONNX - PyTorch| allowed (default: fp32 0.01, fp16 1.0, int8 unchecked)
  parity_min_match=    smallest share of detections matched IoU>0.5 same class (default 0.99 / 0.90 / 0.50)

Examples:
  yolokd export model=runs/detect/student/weights/best.pt format=onnx imgsz=640
  yolokd export model=best.pt format=onnx nms=False        # YOLO26: end-to-end output (1, 300, 6), no NMS needed
  yolokd export model=best.pt format=engine quantize=16    # TensorRT FP16 (NVIDIA GPU + tensorrt package)
"""


def cmd_export(argv: list[str]) -> int:
    """`yolokd export model=... format=...`: see EXPORT_HELP. Returns 0, 1 on a parity failure."""
    import sys

    if not argv or argv[0] in {"help", "-h", "--help"}:
        print(EXPORT_HELP)
        return 0
    from yolokd.config import parse_kv

    args = parse_kv(argv)
    model = args.pop("model", None)
    if not model:
        raise SyntaxError("model= is required, e.g. model=runs/detect/student/weights/best.pt")
    kd = {k: args.pop(k) for k in ("parity", "parity_atol", "parity_min_match") if k in args}
    try:
        out = export_student(
            model,
            parity=kd.get("parity", True) is not False,
            atol=kd.get("parity_atol"),
            min_match=kd.get("parity_min_match"),
            **args,
        )
    except ParityError as e:
        print(f"yolokd export: parity check failed: {e}", file=sys.stderr)
        return 1
    print(f"yolokd export: {out}")
    return 0
