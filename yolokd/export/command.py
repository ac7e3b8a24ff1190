"""`yolokd export`: export a distilled student with Ultralytics' exporter, between a safety check and a parity check.

    yolokd export model=runs/detect/student/weights/best.pt format=onnx imgsz=640
    yolokd export model=best.pt format=engine quantize=16          # TensorRT, on a machine with an NVIDIA GPU

`export_student` refuses bad arguments before reading anything, loads the checkpoint once without running code it
carries (`yolokd.export.safety.load_yolo`), hands that loaded model to Ultralytics' exporter, and checks the exported
file against it (`yolokd.export.parity`): an ONNX file through the edge runtime, a TensorRT engine through
Ultralytics' AutoBackend (and its ONNX intermediate through the edge runtime).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from yolokd.config import DistillationConfigError, closest

ENGINE_FORMATS = {"engine", "tensorrt", "trt"}
# Names Ultralytics' Exporter maps onto one of its formats (ultralytics/engine/exporter.py, Exporter.__call__).
FORMAT_ALIASES = {"tensorrt", "trt", "mlmodel", "mlpackage", "mlprogram", "apple", "ios", "huawei", "cann", "om",
                  "vitis", "vitisai", "versal", "tflite", "tfjs"}
YOLOKD_KEYS = ("model", "parity", "parity_atol", "parity_min_match", "parity_conf")
PARITY_RANGES = {"parity_atol": (0, float("inf")), "parity_min_match": (0, 1), "parity_conf": (0, 1)}

EXPORT_HELP = """\
yolokd export model=<student.pt> [format=onnx] [key=value ...]

Exports a distilled student with Ultralytics' exporter: every Ultralytics export argument works (format, imgsz,
quantize (or half/int8), dynamic, simplify, nms, batch, opset, device, data, ...; see `yolo cfg`). Defaults to
format=onnx.

Before exporting, the checkpoint is loaded once with a restricted unpickler: only the classes of a plain Ultralytics
detection checkpoint are accepted, nothing the file names is called, and a teacher, adapter, distillation wrapper
or hook left in the model is refused (see docs/export.md).
After an ONNX export, the edge runtime yolokd_edge (the code that ships, run without torch) is compared with
PyTorch on sample images; after a TensorRT export, the .engine and its ONNX intermediate are. A mismatch exits 1.

yolokd's own keys:
  parity=True          run the parity check
  parity_atol=         largest raw |export - PyTorch| allowed (default: fp32 0.01, fp16 1.0, int8 unchecked)
  parity_min_match=    smallest share of detections matched IoU>0.5 same class (default 0.99 / 0.90 / 0.50)
  parity_conf=0.25     confidence threshold of the detections compared

Examples:
  yolokd export model=runs/detect/student/weights/best.pt format=onnx imgsz=640
  yolokd export model=best.pt format=onnx nms=False        # YOLO26: end-to-end output (1, 300, 6), no NMS needed
  yolokd export model=best.pt format=engine quantize=16    # TensorRT FP16 (NVIDIA GPU + tensorrt package)
"""


def export_keys() -> set[str]:
    """Ultralytics' export arguments (every format's, from its export table) and the precision aliases."""
    from ultralytics.engine.exporter import export_formats

    return {"format", "imgsz", "device", "half", "int8"} | set().union(*export_formats()["Arguments"])


def check_export_args(args: dict[str, Any]) -> None:
    """Refuse an unknown key (naming the nearest valid ones), a bad value or an unknown format, before anything is
    read: Ultralytics' own argument checks (`get_cfg`) for its keys, ranges for yolokd's."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, get_cfg
    from ultralytics.engine.exporter import export_formats

    valid = export_keys()
    unknown = sorted(k for k in args if k not in valid and k not in YOLOKD_KEYS)
    if unknown:
        k = unknown[0]
        raise DistillationConfigError(
            f"unknown key '{k}'.{closest(k, [*YOLOKD_KEYS, *valid])} Valid keys: yolokd's {', '.join(YOLOKD_KEYS)} "
            f"and Ultralytics' export arguments {', '.join(sorted(valid))}."
        )
    for key, (low, high) in PARITY_RANGES.items():
        value = args.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and low <= value <= high):
            raise DistillationConfigError(f"{key}={value} must be a number from {low} to {high}.")
    if args.get("parity", True) not in (True, False):
        raise DistillationConfigError(f"parity={args['parity']} must be True or False.")
    try:  # half / int8 are left out: Ultralytics warns that they are deprecated, once is enough (at the export)
        get_cfg(DEFAULT_CFG_DICT, {k: v for k, v in args.items() if k in valid and k not in ("half", "int8")})
    except (TypeError, ValueError) as e:
        raise DistillationConfigError(str(e).strip().splitlines()[0]) from None
    formats = list(export_formats()["Argument"][1:])
    fmt = str(args.get("format", "onnx")).lower()
    if fmt not in formats and fmt not in FORMAT_ALIASES:
        raise DistillationConfigError(
            f"format={fmt} is not an export format.{closest(fmt, formats)} Formats: {', '.join(formats)}."
        )


def find_checkpoint(spec: str | Path, key: str = "model") -> Path:
    """The .pt file `key=spec` names: a local path, or an official Ultralytics model name such as yolov8n (which
    Ultralytics downloads; a user's path is never looked up online)."""
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

    from yolokd.checks import resolve_weights

    path = Path(str(spec))
    if path.suffix and path.suffix != ".pt":
        raise DistillationConfigError(
            f"{key}={spec} is not a .pt checkpoint: pass the weights/best.pt of a training run (a .yaml has no "
            f"weights)."
        )
    if path.is_file():
        return path
    if path.parent == Path(".") and path.with_suffix(".pt").name in GITHUB_ASSETS_NAMES:
        try:
            return resolve_weights(spec, key)
        except DistillationConfigError:
            pass
    raise DistillationConfigError(
        f"{key}={spec}: no such file, and not an official Ultralytics model name that could be downloaded; pass "
        f"a checkpoint, e.g. {key}=runs/detect/train/weights/best.pt."
    )


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


def export_student(
    model: str | Path,
    parity: bool = True,
    images: list[np.ndarray] | None = None,
    parity_atol: float | None = None,
    parity_min_match: float | None = None,
    parity_conf: float = 0.25,
    **export_args: Any,
) -> Path:
    """Check, export and verify a distilled student (see module docstring).

    Args:
        model: The student checkpoint (.pt), or an official Ultralytics model name.
        parity: Compare the exported ONNX / TensorRT file with the checkpoint and raise `ParityError` on a mismatch.
        images: Parity images (BGR uint8); default `parity_images` of the dataset the student was trained on.
        parity_atol: Raw-output tolerance of the parity check (default by precision, see `parity.compare`).
        parity_min_match: Matched-detection tolerance of the parity check (default by precision).
        parity_conf: Confidence threshold of the detections compared.
        **export_args: Ultralytics export arguments (format=onnx by default, imgsz, quantize/half/int8, dynamic,
            simplify, nms, batch, opset, device, ...).

    Returns:
        Path of the exported file (or folder, for folder formats such as OpenVINO).

    Raises:
        DistillationConfigError: bad arguments, no such checkpoint, not a clean detection student, or TensorRT
            requested where it cannot run; all raised before anything is written.
        ParityError: the exported file does not reproduce the checkpoint.
    """
    from ultralytics.utils import LOGGER

    from yolokd.export.parity import ParityError, export_parity, format_parity, parity_images
    from yolokd.export.safety import load_yolo

    export_args.setdefault("format", "onnx")
    check_export_args(export_args)
    path = find_checkpoint(model)
    fmt = str(export_args["format"]).lower()
    if fmt in ENGINE_FORMATS:
        check_tensorrt_available()
    yolo = load_yolo(path)  # the only time the file is unpickled
    int8 = export_args.get("int8") or export_args.get("quantize") in (8, "int8")
    if int8 and not export_args.get("data"):  # calibrate on the student's own data, not Ultralytics' coco8 download
        data = (yolo.ckpt.get("train_args") or {}).get("data")
        if data and Path(str(data)).is_file():
            export_args["data"] = data
    try:
        out = Path(yolo.export(**export_args))
    except AssertionError as e:  # Ultralytics' argument checks (e.g. an argument the format does not support)
        raise DistillationConfigError(f"Ultralytics' exporter refused: {str(e).strip().splitlines()[0]}") from None

    checked = [out] if out.suffix == ".onnx" else []
    if fmt in ENGINE_FORMATS:  # the engine, and the ONNX file it was built from
        checked = [f for f in (out.with_suffix(".onnx"), out) if f.is_file()]
    if parity and not checked:
        LOGGER.info(f"yolokd export: parity check runs on ONNX and TensorRT exports only; format={fmt} not checked.")
    if parity and checked and images is None:
        images, source = parity_images(yolo.model.args.get("data"))
        LOGGER.info(f"yolokd export: parity check on {source}")
    for file in checked if parity else []:
        report = export_parity(yolo.model, file, images, parity_atol, parity_min_match, parity_conf)
        LOGGER.info(f"yolokd export: {format_parity(report)}")
        if not report["passed"]:
            raise ParityError(f"{file} does not reproduce {path}: {'; '.join(report['failures'])}")
    return out


def cmd_export(argv: list[str]) -> int:
    """`yolokd export model=... format=...`: see EXPORT_HELP. Returns 0, 1 on a parity failure."""
    import sys

    from yolokd.config import parse_kv
    from yolokd.export.parity import ParityError

    args = parse_kv(argv)
    check_export_args(args)
    model = args.pop("model", None)
    if not model:
        raise SyntaxError("model= is required, e.g. model=runs/detect/student/weights/best.pt")
    try:
        out = export_student(model, **args)
    except ParityError as e:
        print(f"yolokd export: parity check failed: {e}", file=sys.stderr)
        return 1
    print(f"yolokd export: {out}")
    return 0
