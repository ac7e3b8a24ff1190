"""The `yolokd` command: Ultralytics-style `key=value` arguments, one subcommand per job.

    yolokd train model=yolov8n.yaml teacher=runs/detect/teacher/weights/best.pt method=dfd data=synthetic epochs=30
    yolokd methods
    yolokd train help
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from yolokd.config import closest, parse_kv

USAGE = """\
yolokd: knowledge distillation for Ultralytics YOLO detectors.

Usage: yolokd COMMAND [key=value ...]

Commands:
{commands}

Every Ultralytics train argument works with `yolokd train` (epochs=, imgsz=, batch=, device=, ...; see
`yolo cfg`), plus yolokd's own (`yolokd train help`). `data=synthetic` is a built-in dataset generated locally.
Examples:
  yolokd train model=yolov8s.yaml data=synthetic epochs=30 name=teacher          # a teacher, from scratch
  yolokd train model=yolov8n.yaml teacher=runs/detect/teacher/weights/best.pt method=dfd data=synthetic epochs=30
  yolokd train model=yolov8n.yaml data=synthetic epochs=30                        # the plain student baseline
  yolokd train resume=True model=runs/detect/train/weights/last.pt               # continue a stopped run
"""


def cmd_train(argv: list[str]) -> int:
    """Train a student with a teacher (or a plain model without one)."""
    if argv and argv[0] in {"help", "-h", "--help"}:
        print(train_help())
        return 0
    from ultralytics import YOLO

    from yolokd.checks import resolve_weights
    from yolokd.trainer import DistillationTrainer

    args = parse_kv(argv)
    model = args.pop("model", None)
    if args.get("resume") not in (None, False) and model is None and isinstance(args["resume"], str):
        model = args["resume"]
    if not model:
        raise SyntaxError("model= is required, e.g. model=yolov8n.yaml (random init) or model=path/to/student.pt")
    if not str(model).endswith((".yaml", ".yml")):
        model = str(resolve_weights(model, "student"))
    YOLO(model).train(trainer=DistillationTrainer, **args)
    return 0


def train_help() -> str:
    """yolokd's own train arguments with their defaults and meanings (read from the shipped YAML files)."""
    from yolokd.config import cfg_dir, method_cfg_names

    lines = ["yolokd train [key=value ...]: all Ultralytics train arguments (see `yolo cfg`), plus:", ""]
    lines += [f"  {line}" for line in (cfg_dir() / "default.yaml").read_text().splitlines() if not line.startswith("#")]
    for name in method_cfg_names():
        lines.append(f"\n  method={name}:")
        for line in (cfg_dir() / "methods" / f"{name}.yaml").read_text().splitlines():
            if line and not line.startswith("#"):
                lines.append(f"    {name}_{line}")
    return "\n".join(lines)


def cmd_methods(argv: list[str]) -> int:
    """List the distillation methods, one line each, with their default hyper-parameters."""
    from yolokd.config import method_defaults, prefixed
    from yolokd.methods import get_method, list_methods

    for name in list_methods():
        cls = get_method(name)
        print(f"{name:<10} {cls.summary}")
        defaults = prefixed(name, method_defaults(name))
        if defaults:
            print(" " * 11 + "  ".join(f"{k}={v}" for k, v in defaults.items()))
    return 0


def cmd_overhead(argv: list[str]) -> int:
    """Time the student step, the teacher forward and each method's distillation step."""
    from yolokd.bench.overhead import cmd_overhead as run

    return run(argv)


def cmd_bench(argv: list[str]) -> int:
    """Teacher vs plain vs distilled students over seeds: mAP, paired gain, gap closed."""
    from yolokd.bench.gains import cmd_bench as run

    return run(argv)


def cmd_crops(argv: list[str]) -> int:
    """Cut the ground-truth objects of a detection dataset into an image-classification set."""
    from yolokd.data.crops import cmd_crops as run

    return run(argv)


def cmd_export(argv: list[str]) -> int:
    """Export a distilled student (clean-student check first, ONNX parity check after)."""
    from yolokd.export.command import cmd_export as run

    return run(argv)


def cmd_benchmark(argv: list[str]) -> int:
    """Latency on every available runtime, and mAP, of a set of models."""
    from yolokd.bench.latency import cmd_benchmark as run

    return run(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (cmd_train, "train a student with a teacher (teacher=, method=), or a plain model"),
    "methods": (cmd_methods, "list the distillation methods and their defaults"),
    "crops": (cmd_crops, "cut GT objects of a detection set into a classification set (classifier teacher, dicod)"),
    "export": (cmd_export, "export a student (onnx, engine, ...) after a clean-student check; ONNX parity check"),
    "benchmark": (cmd_benchmark, "latency (PyTorch / ONNX Runtime / TensorRT) and mAP of models: CSV, Markdown, PNG"),
    "bench": (cmd_bench, "accuracy gains: teacher, plain and distilled students over seeds (profile=cpu|cpu8|demo|gpu)"),
    "overhead": (cmd_overhead, "time student step, teacher forward and each method's KD step (overhead ratio)"),
}


def usage() -> str:
    return USAGE.format(commands="\n".join(f"  {k:<10} {v[1]}" for k, v in COMMANDS.items()))


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad arguments end with a one-paragraph error and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"yolokd: unknown command '{name}'.{closest(name, list(COMMANDS))}\n\n{usage()}", file=sys.stderr)
        return 2
    from yolokd.checks import DistillationConfigError

    try:
        return COMMANDS[name][0](rest)
    except (DistillationConfigError, SyntaxError, FileNotFoundError) as e:
        print(f"yolokd {name}: error: {e}", file=sys.stderr)
        return 2


def entrypoint() -> None:
    """Console-script entry point."""
    sys.exit(main())
