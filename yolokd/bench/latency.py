"""Deployment benchmark: latency and accuracy of students on every runtime this machine has. `yolokd latency`
(earlier name: `yolokd benchmark`, still accepted).

    yolokd latency models=teacher.pt,plain.pt,distilled.pt data=data.yaml imgsz=640 batch=1,8

For each model, runtime and batch size: the model's forward time on a fixed random batch (letterboxed-size input,
pre-processing and NMS excluded: they are the same for every runtime), `warmup` untimed calls then `iters` timed
ones, reported as mean / p50 / p95 milliseconds per batch and images per second (batch * 1000 / mean). CUDA runs
are synchronised before the clock stops. Accuracy is Ultralytics' `val` mAP50-95 on `data`, run once per model and
runtime on the runtime's own artefact (the .pt, the batch-1 ONNX, the TensorRT engine), so an INT8 engine is scored
as INT8.

Runtimes (`runtimes=auto` picks those available):
  torch-cpu, torch-cuda, torch-cuda-fp16   PyTorch (fused, inference mode)
  onnx-cpu, onnx-cuda                       ONNX Runtime (CPU / CUDA execution provider; host<->device copies timed)
  trt-fp16, trt-int8                        TensorRT engines built by Ultralytics' exporter (INT8 calibrated on
                                            `data`), run through Ultralytics' AutoBackend

Writes benchmark.csv, benchmark.md (with the machine it ran on) and benchmark.png (mAP50-95 against batch-1 p50
latency) under `out`.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from yolokd.config import DistillationConfigError

ALL_RUNTIMES = ("torch-cpu", "torch-cuda", "torch-cuda-fp16", "onnx-cpu", "onnx-cuda", "trt-fp16", "trt-int8")
COLUMNS = ("model", "runtime", "imgsz", "batch", "mean_ms", "p50_ms", "p95_ms", "img_per_s", "map50_95")


def available_runtimes() -> list[str]:
    """Runtimes this machine can run, in `ALL_RUNTIMES` order."""
    import onnxruntime as ort
    import torch

    cuda = torch.cuda.is_available()
    providers = ort.get_available_providers()
    ok = {
        "torch-cpu": True,
        "torch-cuda": cuda,
        "torch-cuda-fp16": cuda,
        "onnx-cpu": "CPUExecutionProvider" in providers,
        "onnx-cuda": cuda and "CUDAExecutionProvider" in providers,
        "trt-fp16": cuda and importlib.util.find_spec("tensorrt") is not None,
        "trt-int8": cuda and importlib.util.find_spec("tensorrt") is not None,
    }
    return [r for r in ALL_RUNTIMES if ok[r]]


def resolve_runtimes(spec: str | list[str] | None) -> list[str]:
    """`auto` (or None) -> every available runtime; a comma list -> those, each checked."""
    have = available_runtimes()
    if spec in (None, "", "auto"):
        return have
    wanted = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    for r in wanted:
        if r not in ALL_RUNTIMES:
            raise DistillationConfigError(f"unknown runtime '{r}'; known: {', '.join(ALL_RUNTIMES)}")
        if r not in have:
            raise DistillationConfigError(
                f"runtime '{r}' is not available here (available: {', '.join(have)}). CUDA runtimes need an NVIDIA "
                f"GPU; onnx-cuda needs onnxruntime-gpu; trt-* need the tensorrt package."
            )
    return wanted


def latency_stats(times_ms: list[float], batch: int) -> dict[str, float]:
    """mean / p50 / p95 of per-batch times (ms) and images per second."""
    t = np.asarray(times_ms, dtype=np.float64)
    mean = float(t.mean())
    return {"mean_ms": mean, "p50_ms": float(np.percentile(t, 50)), "p95_ms": float(np.percentile(t, 95)),
            "img_per_s": batch * 1e3 / mean}


def time_calls(fn: Callable[[], Any], warmup: int, iters: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall times (ms) of `iters` calls of `fn` after `warmup` untimed ones; `sync` runs before each clock read."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


@dataclass
class Prepared:
    """A model ready on one runtime: `run()` does one forward of the benchmark batch; `artifact` is what val loads."""

    run: Callable[[], Any]
    artifact: str
    val_args: dict[str, Any] = field(default_factory=dict)
    sync: Callable[[], None] = lambda: None


def _export(pt: Path, work: Path, tag: str, **args) -> Path:
    """Export `pt` with `yolokd.export.command.export_student` (safe load, no parity) and move the file to
    `work/<tag><suffix>` (Ultralytics writes next to the .pt, so batch sizes would overwrite one another)."""
    from yolokd.export.command import export_student

    done = [f for f in sorted(work.glob(f"{tag}.*")) if f.stat().st_mtime >= pt.stat().st_mtime]
    if done:  # exported by an earlier run from the same checkpoint
        return done[0]
    f = export_student(pt, parity=False, **args)
    dst = work / f"{tag}{f.suffix}"
    shutil.move(str(f), dst)
    return dst


def prepare(runtime: str, pt: Path, batch: int, imgsz: int, work: Path, data: str | None, name: str = "") -> Prepared:
    """Load / export `pt` for `runtime` and build its timed call on a fixed random (batch, 3, imgsz, imgsz) input.

    Exported artefacts go to `work/<name>_b<batch>_<imgsz>[_<runtime>].<suffix>` (`name` defaults to the file stem).
    """
    stem = (name or pt.stem).replace("/", "_").replace("#", "_")
    import torch

    x = np.random.default_rng(0).random((batch, 3, imgsz, imgsz), dtype=np.float32)
    if runtime.startswith("torch"):
        from ultralytics.nn.tasks import load_checkpoint

        dev = "cuda" if "cuda" in runtime else "cpu"
        half = runtime.endswith("fp16")
        model, _ = load_checkpoint(pt, device=dev, fuse=True)
        model = model.half() if half else model
        xt = torch.from_numpy(x).to(dev)
        xt = xt.half() if half else xt

        def run():
            with torch.inference_mode():
                return model(xt)

        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        return Prepared(run, str(pt), {"device": 0 if dev == "cuda" else "cpu", "half": half}, sync)
    if runtime.startswith("onnx"):
        from yolokd_edge import EdgeDetector

        f = _export(pt, work, f"{stem}_b{batch}_{imgsz}", format="onnx", imgsz=imgsz, batch=batch)
        f1 = f if batch == 1 else _export(pt, work, f"{stem}_b1_{imgsz}", format="onnx", imgsz=imgsz, batch=1)
        edge = EdgeDetector(f, device="cuda" if runtime == "onnx-cuda" else "cpu")  # the deployed session setup
        return Prepared(lambda: edge.session.run(None, {edge.input_name: x}), str(f1),
                        {"device": 0 if runtime == "onnx-cuda" else "cpu", "batch": 1})
    if runtime.startswith("trt"):
        from ultralytics.nn.autobackend import AutoBackend

        q = {"quantize": 8, "data": data} if runtime == "trt-int8" else {"quantize": 16}
        f = _export(pt, work, f"{stem}_b{batch}_{imgsz}_{runtime}", format="engine", imgsz=imgsz, batch=batch,
                    device=0, **q)
        f1 = f if batch == 1 else _export(pt, work, f"{stem}_b1_{imgsz}_{runtime}", format="engine", imgsz=imgsz,
                                          batch=1, device=0, **q)
        backend = AutoBackend(str(f), device=torch.device("cuda:0"), fp16=True, verbose=False)
        xt = torch.from_numpy(x).cuda().half()
        return Prepared(lambda: backend(xt), str(f1), {"device": 0, "batch": 1}, torch.cuda.synchronize)
    raise DistillationConfigError(f"unknown runtime '{runtime}'")


def evaluate(artifact: str, data: str, imgsz: int, val_args: dict[str, Any], workers: int | None) -> float:
    """Ultralytics val mAP50-95 of an artefact (.pt / .onnx / .engine) on `data`."""
    from ultralytics import YOLO

    args = dict(data=data, imgsz=imgsz, plots=False, verbose=False, save_json=False, **val_args)
    if workers is not None:
        args["workers"] = workers
    half = args.pop("half", False)
    if half:
        args["quantize"] = 16
    return float(YOLO(artifact, task="detect").val(**args).box.map)


def model_labels(models: list[Path]) -> list[str]:
    """Short unique names: the run folder for `<run>/weights/<x>.pt`, else the file stem."""
    labels = []
    for m in models:
        label = m.parent.parent.name if m.parent.name == "weights" else m.stem
        if m.parent.name == "weights" and m.stem not in {"best", "last"}:
            label += f"/{m.stem}"
        n, base = 2, label
        while label in labels:
            label, n = f"{base}#{n}", n + 1
        labels.append(label)
    return labels


def benchmark(
    models: list[str | Path],
    data: str | None = None,
    imgsz: int = 640,
    batch: tuple[int, ...] = (1, 8),
    runtimes: str | list[str] | None = "auto",
    warmup: int = 10,
    iters: int = 50,
    out: str | Path = "runs/benchmark",
    val: bool = True,
    workers: int | None = None,
) -> list[dict[str, Any]]:
    """Measure every (model, runtime, batch) (see module docstring) and write CSV / Markdown / PNG under `out`.

    Returns:
        One dict per (model, runtime, batch) with `COLUMNS` keys (map50_95 NaN when val is off or failed).
    """
    from ultralytics.utils import LOGGER, TQDM

    from yolokd.export.command import find_checkpoint
    from yolokd.export.safety import load_student

    paths = [find_checkpoint(m, "models") for m in models]
    for p in paths:  # refuse an unsafe file or a non-detector before anything is written or loaded unrestricted
        load_student(p)
    labels = model_labels(paths)
    rts = resolve_runtimes(runtimes)
    if val and not data:
        raise DistillationConfigError("data= is needed for the mAP50-95 column (or pass val=False)")
    if data:  # a preset name such as data=synthetic becomes its generated yaml (val and INT8 calibration)
        from yolokd.data.synthetic import resolve_data

        data = resolve_data(data)
    out = Path(out)
    work = out / "artifacts"
    work.mkdir(parents=True, exist_ok=True)
    rows, maps = [], {}
    jobs = [(p, lab, r, b) for p, lab in zip(paths, labels) for r in rts for b in batch]
    bar = TQDM(jobs, desc="benchmark", total=len(jobs))
    for pt, label, runtime, b in bar:
        bar.set_description(f"benchmark {label} {runtime} batch {b}")
        row = {"model": label, "runtime": runtime, "imgsz": imgsz, "batch": b}
        try:
            prep = prepare(runtime, pt, b, imgsz, work, data, label)
            row.update(latency_stats(time_calls(prep.run, warmup, iters, prep.sync), b))
            key = (label, runtime)
            if val and key not in maps:
                maps[key] = evaluate(prep.artifact, data, imgsz, prep.val_args, workers)
        except DistillationConfigError:
            raise
        except Exception as e:  # one runtime failing (e.g. a TensorRT build error) must not lose the others
            LOGGER.warning(f"benchmark: {label} on {runtime} batch {b} failed: {type(e).__name__}: {e}")
            row.update({k: math.nan for k in ("mean_ms", "p50_ms", "p95_ms", "img_per_s")})
        row["map50_95"] = maps.get((label, runtime), math.nan)
        rows.append(row)
    write_csv(rows, out / "benchmark.csv")
    md = markdown(rows, dict(imgsz=imgsz, warmup=warmup, iters=iters, data=data))
    (out / "benchmark.md").write_text(md)
    plot(rows, out / "benchmark.png")
    LOGGER.info(f"\n{md}\nWritten to {out.resolve()}/benchmark.(csv|md|png)")
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """One line per (model, runtime, batch), `COLUMNS` order."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: r.get(k) for k in COLUMNS} for r in rows)


def machine() -> str:
    """One line describing this machine and the software versions measured."""
    import onnxruntime as ort
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {n} CPU cores, {gpu}; torch {torch.__version__}, onnxruntime {ort.__version__}"


def _fmt(v: Any, digits: int) -> str:
    return "—" if isinstance(v, float) and math.isnan(v) else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict[str, Any]], setting: dict[str, Any]) -> str:
    """The results table (Markdown), headed by the machine and the setting it was measured in."""
    head = (
        f"Measured on {machine()}. Input {setting['imgsz']}x{setting['imgsz']}, model forward only (no "
        f"pre-processing / NMS), {setting['warmup']} warm-up + {setting['iters']} timed calls per row; ms per batch. "
        f"mAP50-95: Ultralytics val on {setting['data'] or '—'}.\n\n"
        "| model | runtime | batch | mean ms | p50 ms | p95 ms | img/s | mAP50-95 |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['model']} | {r['runtime']} | {r['batch']} | {_fmt(r['mean_ms'], 2)} | {_fmt(r['p50_ms'], 2)} | "
        f"{_fmt(r['p95_ms'], 2)} | {_fmt(r['img_per_s'], 1)} | {_fmt(r['map50_95'], 4)} |\n"
        for r in rows
    )
    return head + body


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """mAP50-95 against batch-1 p50 latency, one point per (model, runtime); matplotlib only (no font download)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = min(r["batch"] for r in rows)
    pts = [r for r in rows if r["batch"] == b and not math.isnan(r["p50_ms"])]
    models = list(dict.fromkeys(r["model"] for r in pts))
    runtimes = list(dict.fromkeys(r["runtime"] for r in pts))
    markers = "osD^v<>p*h"
    has_map = any(not math.isnan(r["map50_95"]) for r in pts)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in pts:
        y = r["map50_95"] if has_map else r["img_per_s"]
        ax.scatter(r["p50_ms"], y, color=f"C{models.index(r['model']) % 10}",
                   marker=markers[runtimes.index(r["runtime"]) % len(markers)], s=60, zorder=3)
        ax.annotate(f"{r['model']} / {r['runtime']}", (r["p50_ms"], y), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xlabel(f"p50 latency, batch {b} (ms)")
    ax.set_ylabel("mAP50-95" if has_map else "images / s")
    ax.set_title("accuracy vs latency" if has_map else "throughput vs latency (no val)")
    if pts and max(r["p50_ms"] for r in pts) / max(min(r["p50_ms"] for r in pts), 1e-9) > 20:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


BENCHMARK_HELP = """\
yolokd latency models=a.pt,b.pt[,...] data=<data.yaml> [imgsz=640] [batch=1,8] [runtimes=auto] [key=value ...]

Latency (mean / p50 / p95 ms per batch, images/s) of each model on each runtime, and mAP50-95 on data (Ultralytics
val of the runtime's own artefact). Writes benchmark.csv, benchmark.md and benchmark.png under out=.

  runtimes=auto      or a comma list of: torch-cpu, torch-cuda, torch-cuda-fp16, onnx-cpu, onnx-cuda, trt-fp16,
                     trt-int8 (auto: every one available on this machine)
  warmup=10 iters=50 untimed / timed calls per row
  val=True           compute mAP50-95 (needs data=)
  workers=           val dataloader workers
  out=runs/benchmark output folder (ONNX / TensorRT artefacts in out/artifacts, reused on re-runs)
"""


def cmd_benchmark(argv: list[str]) -> int:
    """`yolokd latency models=... data=...`: see BENCHMARK_HELP."""
    from yolokd.config import check_number, check_whole_numbers, closest, parse_kv

    a = parse_kv(argv)
    models = a.pop("models", None) or a.pop("model", None)
    if not models:
        raise SyntaxError("models= is required, e.g. models=teacher.pt,student.pt (see `yolokd latency help`)")
    if isinstance(models, str):
        models = models.split(",")
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    batch = check_whole_numbers("batch", a.pop("batch", (1, 8)), ">= 1", "1,8")
    counts = {"imgsz": ">= 32", "warmup": ">= 0", "iters": ">= 1", "workers": ">= 0"}
    a.update({k: check_number(k, a[k], int, allowed) for k, allowed in counts.items() if a.get(k) is not None})
    known = {"data", "imgsz", "runtimes", "warmup", "iters", "out", "val", "workers"}
    unknown = sorted(set(a) - known)
    if unknown:
        valid = ["models", "batch", *sorted(known)]
        hint = closest(unknown[0], valid)
        raise SyntaxError(f"unknown benchmark argument(s) {unknown}.{hint} Valid: {', '.join(valid)}")
    benchmark(models, batch=batch, **a)
    return 0
