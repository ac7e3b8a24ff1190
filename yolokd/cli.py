"""The `yolokd` command: Ultralytics-style `key=value` arguments, one subcommand per job.

    yolokd train model=yolov8n.yaml teacher=runs/detect/teacher/weights/best.pt method=dfd data=synthetic epochs=30
    yolokd methods
    yolokd train help
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from yolokd.config import DistillationConfigError, closest, parse_kv

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
    yolo = YOLO(model)
    ckpt = yolo.ckpt or {}
    if args.get("resume") and not (ckpt.get("epoch", -1) >= 0 and ckpt.get("optimizer") is not None):
        # Ultralytics' own test; it would warn and start a new run on its default dataset instead
        raise DistillationConfigError(
            f"model={model} cannot be resumed: it holds no optimizer state (the run finished, which strips it, or "
            f"it is not a training checkpoint). To train on from it, start a new run: yolokd train model={model} "
            "data=... epochs=...")
    yolo.train(trainer=DistillationTrainer, **args)
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

    if argv:
        raise SyntaxError(f"yolokd methods takes no arguments (got {' '.join(argv)})")
    width = max(map(len, list_methods()))
    for name in list_methods():
        cls = get_method(name)
        print(f"{name:<{width}} {cls.summary}")
        defaults = prefixed(name, method_defaults(name))
        if defaults:
            print(" " * (width + 1) + "  ".join(f"{k}={v}" for k, v in defaults.items()))
    return 0


@dataclass(frozen=True)
class Command:
    """A subcommand: `run` and `help` are "module:attribute" (imported only when used, so `yolokd --help` stays
    cheap); `help` is a string or a function returning one."""

    run: str
    summary: str
    help: str


COMMANDS: dict[str, Command] = {
    "train": Command("yolokd.cli:cmd_train", "train a student with a teacher (teacher=, method=), or a plain model",
                     "yolokd.cli:train_help"),
    "methods": Command("yolokd.cli:cmd_methods", "list the distillation methods and their defaults",
                       "yolokd.cli:METHODS_HELP"),
    "gains": Command("yolokd.bench.gains:cmd_gains", "ACCURACY: does distillation pay? teacher, plain and distilled "
                     "students trained over seeds (profile=scratch|demo|cpu|cpu8|gpu)", "yolokd.bench.gains:GAINS_HELP"),
    "latency": Command("yolokd.bench.latency:cmd_benchmark", "SPEED: latency (PyTorch / ONNX Runtime / TensorRT) and "
                       "mAP of trained models on each runtime", "yolokd.bench.latency:BENCHMARK_HELP"),
    "overhead": Command("yolokd.bench.overhead:cmd_overhead", "training cost: time of the student step, the teacher "
                        "forward and each method's KD step", "yolokd.bench.overhead:__doc__"),
    "crops": Command("yolokd.data.crops:cmd_crops", "cut GT objects of a detection set into a classification set "
                     "(classifier teacher, dicod)", "yolokd.data.crops:CROPS_HELP"),
    "explain": Command("yolokd.explain:cmd_explain", "draw what the teacher teaches: each method's masks, weights and "
                       "ranks on your images, both models' detections", "yolokd.explain:EXPLAIN_HELP"),
    "export": Command("yolokd.export.command:cmd_export", "export a student (onnx, engine, ...) after a safety check; "
                      "parity check after", "yolokd.export.command:EXPORT_HELP"),
}
ALIASES = {"bench": "gains", "benchmark": "latency"}  # the earlier names, which were easy to confuse
HELP_WORDS = {"help", "-h", "--help"}
METHODS_HELP = "yolokd methods: the distillation methods, one line each, with their default hyper-parameters."


def _load(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def usage() -> str:
    lines = [f"  {k:<10} {c.summary}" for k, c in COMMANDS.items()]
    lines += [f"  {k:<10} old name of `{v}`" for k, v in ALIASES.items()]
    return USAGE.format(commands="\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; `help`/`--help` after any of them prints its help; bad arguments end with a one-line
    error and exit code 2, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in HELP_WORDS:
        print(usage())
        return 0
    name, rest = ALIASES.get(argv[0], argv[0]), argv[1:]
    if name not in COMMANDS:
        print(f"yolokd: unknown command '{name}'.{closest(name, [*COMMANDS, *ALIASES])} "
              "Run `yolokd --help` for the commands.", file=sys.stderr)
        return 2
    command = COMMANDS[name]
    if rest and rest[0] in HELP_WORDS:
        text = _load(command.help)
        print((text() if callable(text) else text).strip())
        return 0
    try:
        return _load(command.run)(rest)
    except (ValueError, SyntaxError, FileNotFoundError) as e:  # DistillationConfigError is a ValueError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"yolokd {argv[0]}: error: {first}", file=sys.stderr)
        return 2


def entrypoint() -> None:
    """Console-script entry point."""
    sys.exit(main())
