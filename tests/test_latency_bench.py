"""`yolokd latency` (earlier name `yolokd benchmark`): latency statistics, runtime selection, an end-to-end CPU run."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch

from test_export import IMGSZ, students  # noqa: F401  (shared session fixture)
from yolokd.bench.latency import (
    available_runtimes,
    benchmark,
    cmd_benchmark,
    latency_stats,
    model_labels,
    resolve_runtimes,
    time_calls,
)
from yolokd.config import DistillationConfigError


def test_latency_stats_hand_computed():
    s = latency_stats([1.0, 2.0, 3.0, 4.0], batch=2)
    assert s["mean_ms"] == 2.5 and s["p50_ms"] == 2.5
    assert s["p95_ms"] == pytest.approx(3.85)  # linear interpolation: 3 + 0.85 * (4 - 3)
    assert s["img_per_s"] == pytest.approx(800.0)  # 2 images per 2.5 ms


def test_time_calls_counts_warmup_and_syncs():
    calls, syncs = [], []
    times = time_calls(lambda: calls.append(1), warmup=3, iters=5, sync=lambda: syncs.append(1))
    assert len(times) == 5 and len(calls) == 8 and len(syncs) == 6 and all(t >= 0 for t in times)


def test_runtime_selection():
    have = available_runtimes()
    assert have[:1] == ["torch-cpu"] and "onnx-cpu" in have
    assert resolve_runtimes("auto") == have
    assert resolve_runtimes("onnx-cpu, torch-cpu") == ["onnx-cpu", "torch-cpu"]
    with pytest.raises(DistillationConfigError, match="unknown runtime 'onnx-gpu'"):
        resolve_runtimes("onnx-gpu")
    if not torch.cuda.is_available():
        assert have == ["torch-cpu", "onnx-cpu"]
        with pytest.raises(DistillationConfigError, match="not available here"):
            resolve_runtimes("trt-fp16")


def test_model_labels_unique():
    paths = [Path("runs/a/weights/best.pt"), Path("runs/b/weights/best.pt"), Path("x/best.pt"),
             Path("runs/a/weights/epoch3.pt"), Path("y/best.pt")]
    assert model_labels(paths) == ["a", "b", "best", "a/epoch3", "best#2"]


def test_benchmark_cpu_end_to_end(students, tmp_path):  # noqa: F811
    out = tmp_path / "bench"
    models = [students["v8"]["detecting"], students["26"]["detecting"]]
    rows = benchmark(models, data=students["data"], imgsz=IMGSZ, batch=(1, 2), runtimes="torch-cpu,onnx-cpu",
                     warmup=1, iters=3, out=out, workers=0)
    assert [(r["model"], r["runtime"], r["batch"]) for r in rows] == [
        (m, rt, b) for m in ("v8_detecting", "26_detecting") for rt in ("torch-cpu", "onnx-cpu") for b in (1, 2)]
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p95_ms"] and r["img_per_s"] == pytest.approx(r["batch"] * 1e3 / r["mean_ms"])
        assert 0.0 <= r["map50_95"] <= 1.0
    with open(out / "benchmark.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and float(table[0]["p50_ms"]) == pytest.approx(rows[0]["p50_ms"])
    md = (out / "benchmark.md").read_text()
    assert "| model | runtime | batch | mean ms | p50 ms | p95 ms | img/s | mAP50-95 |" in md
    assert md.count("\n| ") == 1 + 8 and "\n|---|" in md and "CPU cores" in md  # header, rule, 8 rows
    assert (out / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "artifacts").iterdir()) == [
        f"{m}_detecting_b{b}_{IMGSZ}.onnx" for m in ("26", "v8") for b in (1, 2)]


def test_cmd_benchmark_arguments(students, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "b"
    argv = [f"models={students['v8']['distilled']}", "batch=1", "runtimes=onnx-cpu", f"imgsz={IMGSZ}", "val=False",
            "warmup=1", "iters=2", f"out={out}"]
    assert cmd_benchmark(argv) == 0
    with open(out / "benchmark.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["runtime"] == "onnx-cpu" and row["batch"] == "1" and math.isnan(float(row["map50_95"]))
    with pytest.raises(SyntaxError, match="unknown benchmark argument"):
        cmd_benchmark(argv + ["epochs=3"])
    with pytest.raises(DistillationConfigError, match="data= is needed"):
        cmd_benchmark(argv[:4] + [f"out={out}"])
    for bad, message in (("iters=0", "iters=0 must be a whole number >= 1."),
                         ("imgsz=abc", "imgsz=abc must be a whole number >= 32.")):
        with pytest.raises(DistillationConfigError, match=re.escape(message)):
            cmd_benchmark(argv + [bad])
    with pytest.raises(DistillationConfigError, match=re.escape("batch=0 must be whole numbers >= 1 separated by")):
        cmd_benchmark(argv + ["batch=0"])
    from yolokd.cli import main

    assert main(["latency", "help"]) == 0 and "runtimes=auto" in capsys.readouterr().out
