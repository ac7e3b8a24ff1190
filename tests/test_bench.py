"""`yolokd bench`: paired summary arithmetic, skipping finished runs, and a tiny end-to-end profile."""

import json
import math

import pytest

from yolokd.bench.gains import Profile, bench, markdown, summarize


def rec(m):
    return {"map50_95": m, "map50": 2 * m, "sec_per_epoch": 1.0}


def test_summary_pairs_by_seed_and_computes_gap_closed():
    p = Profile(methods=("dfd",), seeds=(0, 1))
    results = {"teacher": rec(0.5), "plain_s0": rec(0.2), "plain_s1": rec(0.3), "dfd_s0": rec(0.35), "dfd_s1": rec(0.3)}
    rows = {r["student"]: r for r in summarize(p, results)}
    assert rows["dfd"]["gain"] == pytest.approx([0.15, 0.0])
    # seed 0 closes 0.15 / 0.3 = 50 % of its gap, seed 1 closes 0 %: mean 25 %
    assert rows["dfd"]["gap_closed"] == pytest.approx(0.25)
    assert rows["dfd"]["wins"] == 1 and rows["plain"]["wins"] == 0
    md = markdown(p, results, list(rows.values()))
    assert "| dfd | 0.3250 ± 0.0354 |" in md and "25.0 %" in md


def test_gap_closed_undefined_when_teacher_not_better():
    p = Profile(methods=("dfd",), seeds=(0,))
    rows = summarize(p, {"teacher": rec(0.2), "plain_s0": rec(0.3), "dfd_s0": rec(0.31)})
    assert math.isnan(rows[1]["gap_closed"])


@pytest.mark.slow
def test_tiny_bench_runs_then_skips_finished_runs(tmp_path, tiny_data):
    p = Profile(data=tiny_data, methods=("fitnet", "dicod"), seeds=(0,), epochs=1, teacher_epochs=1, imgsz=64,
                batch=8, student_init_epochs=1, cls_teacher_epochs=1, jobs=2, out=str(tmp_path / "bench"))
    md = bench(p)
    assert md.exists() and (md.parent / "benchmarks.png").exists()
    data = json.loads((md.parent / "benchmarks.json").read_text())
    assert {"teacher", "student_init", "plain_s0", "fitnet_s0", "dicod_s0"} <= set(data["results"])
    assert (md.parent / "crops" / "crops.yaml").exists() and (md.parent / "cls_teacher" / "result.json").exists()
    stamps = {f: f.stat().st_mtime for f in (md.parent).glob("*/result.json")}
    bench(p)  # everything done: nothing is retrained
    assert stamps == {f: f.stat().st_mtime for f in (md.parent).glob("*/result.json")}
