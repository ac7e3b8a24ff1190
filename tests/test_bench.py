"""`yolokd gains` (earlier name `yolokd bench`): paired summary arithmetic, skipping finished runs, a tiny profile."""

import json
import math
from dataclasses import replace

import pytest

from yolokd.bench.gains import Profile, bench, markdown, summarize, variant_gain_per_seed


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
    # paired t = sqrt(2) * mean(0.15, 0) / std(0.15, 0) = sqrt(2) * 0.075 / 0.1061 = 1.0
    assert rows["dfd"]["t"] == pytest.approx(1.0) and "| 1/2 | 1.0 | 25.0 % |" in md
    assert md.splitlines()[-3].endswith("| 1.0 | — |")  # dfd row: no overhead measured here
    assert "needs t > 6.31 with 2 seeds" in md
    one = Profile(methods=("dfd",), seeds=(0,))
    md = markdown(one, results, summarize(one, results))
    assert "it needs at least 2 seeds" in md and "nan" not in md.lower()
    fifteen = Profile(methods=("dfd",), seeds=tuple(range(15)))  # Student's t, 14 degrees of freedom: 1.761
    results = {"teacher": rec(0.5), **{f"{r}_s{s}": rec(0.2 + 0.01 * s + (0.01 if r == "dfd" else 0) * (s % 3 > 0))
                                       for r in ("plain", "dfd") for s in range(15)}}
    assert "needs t > 1.76 with 15 seeds" in markdown(fifteen, results, summarize(fifteen, results))


def test_a_composition_is_paired_with_its_last_part_too():
    p = Profile(methods=("ld", "dfd+ld", "dfd"), seeds=(0, 1))
    results = {"teacher": rec(0.5), "plain_s0": rec(0.2), "plain_s1": rec(0.3), "ld_s0": rec(0.3), "ld_s1": rec(0.35),
               "dfd+ld_s0": rec(0.32), "dfd+ld_s1": rec(0.34), "dfd_s0": rec(0.1), "dfd_s1": rec(0.1)}
    rows = {r["student"]: r for r in summarize(p, results)}
    assert rows["dfd+ld"]["over_part"] == pytest.approx([0.02, -0.01])  # against ld of the same seed
    assert "over_part" not in rows["ld"] and "over_part" not in rows["dfd"]
    assert "| +0.0050 ± 0.0212 vs ld, 1/2 |" in markdown(p, results, list(rows.values()))


def test_variant_runs_are_paired_with_the_shared_plain_runs_and_the_table_names_its_code():
    p = Profile(methods=("dfd",), seeds=(0, 1), variant="nocap")
    assert (p.run_name("dfd", 0), p.run_name("plain", 0)) == ("dfd-nocap_s0", "plain_s0")
    results = {"teacher": {**rec(0.5), "code": "abc"}, "plain_s0": {**rec(0.2), "code": "abc"},
               "plain_s1": {**rec(0.3), "code": "abc"}, "dfd-nocap_s0": {**rec(0.25), "kd_scale": 0.5, "code": "abc"},
               "dfd-nocap_s1": {**rec(0.35), "kd_scale": 0.3, "code": "def"}}
    rows = {r["student"]: r for r in summarize(p, results)}
    assert rows["dfd"]["gain"] == pytest.approx([0.05, 0.05]) and rows["dfd"]["kd_scale"] == pytest.approx(0.4)
    md = markdown(p, results, list(rows.values()), command="yolokd bench variant=nocap")
    assert md.startswith("`yolokd bench variant=nocap`") and "`abc`, `def` (**runs of several code versions**)" in md
    assert "| 0.40 |" in md  # the cap's mean scale factor
    results["dfd-nocap_s1"]["code"] = "abc"
    assert "several" not in markdown(p, results, list(rows.values()))


def test_mean_column_of_results_csv(tmp_path):
    from yolokd.bench.gains import mean_column

    (tmp_path / "results.csv").write_text("epoch, train/kd_scale, x\n1, 0.5, 3\n2, 0.25, 4\n")
    assert mean_column(tmp_path, "train/kd_scale") == pytest.approx(0.375)
    assert math.isnan(mean_column(tmp_path, "train/absent"))


def test_epoch_seconds_counts_across_a_resume(tmp_path):
    """Ultralytics restarts results.csv's clock on resume: epochs of 10, 10, then (resumed) 12 and 12 seconds."""
    from yolokd.bench.gains import epoch_seconds

    (tmp_path / "results.csv").write_text("epoch, time, x\n1, 10, 0\n2, 20, 0\n3, 12, 0\n4, 24, 0\n")
    assert epoch_seconds(tmp_path) == pytest.approx(11.0)  # dividing the last time by 4 epochs would give 6


@pytest.mark.parametrize("argv,message", [
    (["profile=scratchh"], "profile=scratchh is not a benchmark profile. Did you mean 'scratch'?"),
    (["methods=dfd,pgdd"], "Unknown distillation method 'pgdd'"),
    (["methods=null,pgdd"], "Unknown distillation method 'pgdd'"),  # the null row is a row, not a method
    (["variant=x", "nbs=16"], "variant= shares the plain runs, so it may change yolokd arguments only, not nbs"),
    (["variant=x", "epochs=3"], "variant= shares the plain runs, so it may change yolokd arguments only, not epochs"),
    (["seeds=0,a"], "seeds=0,a must be whole numbers >= 0 separated by commas, e.g. seeds=0,1,2."),
    (["seeds=-1"], "seeds=-1 must be whole numbers >= 0"),
    (["seeds="], "'seeds=' has no value"),
    (["jobs=abc"], "jobs=abc must be a whole number >= 1 (profile=cpu has 2)."),
    (["epochs=0"], "epochs=0 must be a whole number >= 1"),
    (["epochs=2.5"], "epochs=2.5 must be a whole number >= 1"),
    (["imgsz=16"], "imgsz=16 must be a whole number >= 32"),
    (["fraction=1.5"], "fraction=1.5 must be a number in (0, 1]"),
    (["fraction=0"], "fraction=0 must be a number in (0, 1]"),  # the open end of the range
    (["lr0=abc"], "'lr0=abc' is of invalid type str."),  # Ultralytics' own check, one line instead of its TypeError
    (["kd_fade=3"], "kd_fade=3 is out of range: it must be in [0, 1]"),
])
def test_bad_bench_arguments_stop_before_any_run(argv, message, tmp_path, capsys):
    from yolokd.cli import main

    assert main(["bench", f"out={tmp_path / 'b'}", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_report_writes_the_table_of_finished_runs_and_trains_nothing(tmp_path, capsys):
    """`report=true`: while a run of the command has not finished, a one-line error names it with the epochs its
    last.pt holds (and counts the runs not started yet), and no run is started (it names the seeds whose runs have
    all finished, whose table `seeds=` gives); once all have finished, the table is the one the command without
    `report=true` writes (that command above it), with the classifier teacher's record reduced to its checkpoint."""
    import torch

    from yolokd.cli import main

    out = tmp_path / "b"
    records = {"teacher": rec(0.5), "cls_teacher": {"top1": 0.9, "best": "c.pt"}, "plain_s0": rec(0.2),
               "plain_s1": rec(0.3), "dicod_s0": rec(0.25)}
    for name, r in records.items():
        (out / name).mkdir(parents=True)
        (out / name / "result.json").write_text(json.dumps(r))
    (out / "dicod_s1" / "weights").mkdir(parents=True)
    torch.save({"epoch": 4}, out / "dicod_s1" / "weights" / "last.pt")  # interrupted after its 5th epoch
    (out / "overhead.json").write_text(json.dumps({"dicod": 1.4}))  # measured already: no timing run
    argv = ["gains", "profile=scratch", f"out={out}", "methods=dicod", "seeds=0,1", "report=true"]
    before = sorted(p.name for p in out.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"in {out}, not finished: dicod_s1 (5 epochs)." in err
    assert "without report=true" in err and sorted(p.name for p in out.iterdir()) == before
    assert err.endswith("Every run of seeds 0 has finished: add seeds=0 for their table.")
    assert main([*argv[:3], "methods=dicod,pdf,rm", *argv[4:]]) == 2  # runs not started are counted, a few named
    err = capsys.readouterr().err.strip()
    assert f"in {out}, not finished: dicod_s1 (5 epochs); 4 not started (pdf_s0, rm_s0, pdf_s1, ...). Run" in err
    assert "Every run of seeds" not in err and sorted(p.name for p in out.iterdir()) == before
    assert main([*argv[:-2], "seeds=0", "report=true"]) == 0  # what the hint says: the table of that seed
    assert "| dicod | 0.2500 |" in (out / "benchmarks.md").read_text()
    (out / "dicod_s1" / "result.json").write_text(json.dumps(rec(0.32)))
    assert main(argv) == 0
    md = (out / "benchmarks.md").read_text()
    assert md.startswith(f"`yolokd gains profile=scratch out={out} methods=dicod seeds=0,1`\n")
    assert "| dicod | 0.2850 ± 0.0495 |" in md and "| 1.40 |" in md  # gains +0.05, +0.02
    assert json.loads((out / "benchmarks.json").read_text())["results"]["cls_teacher"] == {"best": "c.pt"}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted([*records, "dicod_s1"])
    assert main(["gains", f"out={out}", "report=maybe"]) == 2
    assert "report=maybe is not true or false" in capsys.readouterr().err


def test_gap_closed_undefined_when_teacher_not_better():
    p = Profile(methods=("dfd",), seeds=(0,))
    rows = summarize(p, {"teacher": rec(0.2), "plain_s0": rec(0.3), "dfd_s0": rec(0.31)})
    assert math.isnan(rows[1]["gap_closed"])


@pytest.mark.slow
def test_tiny_bench_runs_then_skips_finished_runs(tmp_path, tiny_data):
    p = Profile(data=tiny_data, methods=("fitnet", "dicod", "null"), seeds=(0,), epochs=1, teacher_epochs=1, imgsz=64,
                batch=8, student_init_epochs=1, cls_teacher_epochs=1, jobs=2, out=str(tmp_path / "bench"))
    md = bench(p)
    assert md.exists() and (md.parent / "benchmarks.png").exists() and (md.parent / "benchmarks-epochs.png").exists()
    data = json.loads((md.parent / "benchmarks.json").read_text())
    assert {"teacher", "student_init", "plain_s0", "fitnet_s0", "dicod_s0", "null_s0"} <= set(data["results"])
    assert "lrf: 0.0101" in (md.parent / "null_s0" / "args.yaml").read_text()  # the nudge reached the run
    assert (md.parent / "crops" / "crops.yaml").exists() and (md.parent / "cls_teacher" / "result.json").exists()
    overhead = json.loads((md.parent / "overhead.json").read_text())  # measured on the run's own models
    assert set(overhead) == {"fitnet", "dicod"} and all(0 < v < 20 for v in overhead.values())
    assert f"| {overhead['dicod']:.2f} |" in md.read_text()
    stamps = {f: f.stat().st_mtime for f in (md.parent).glob("*/result.json")}
    bench(p)  # everything done: nothing is retrained
    assert stamps == {f: f.stat().st_mtime for f in (md.parent).glob("*/result.json")}


@pytest.mark.parametrize("arg,message", [("iters=abc", "iters=abc must be a whole number >= 1."),
                                         ("batch=0", "batch=0 must be a whole number >= 1."),
                                         ("imgsz=16", "imgsz=16 must be a whole number >= 32.")])
def test_overhead_refuses_a_count_of_the_wrong_kind_in_one_line(arg, message, capsys):
    from yolokd.cli import main

    assert main(["overhead", "model=yolov8n.yaml", "teacher=yolov8s.yaml", arg]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_overhead_times_every_method_with_a_checkpoint_student(tmp_path):
    """`yolokd overhead` accepts a trained .pt student (not only a .yaml) and times the student step, the teacher
    forward and each method; the printed overhead is kd step / (student step + teacher forward)."""
    from tests.helpers import save_checkpoint
    from yolokd.bench.overhead import measure, report

    names = {i: f"c{i}" for i in range(3)}
    student = save_checkpoint(tmp_path / "student.pt", "yolov8n.yaml", names)
    teacher = save_checkpoint(tmp_path / "teacher.pt", "yolov8n.yaml", names)
    times = measure(str(student), str(teacher), ["fitnet", "pfi"], imgsz=64, batch=2, iters=1, warmup=0)
    assert set(times) == {"student", "teacher", "fitnet", "pfi"} and all(t > 0 for t in times.values())
    table = report(times)
    ratio = times["pfi"] / (times["student"] + times["teacher"])
    assert f"{ratio:.3f}" in table.splitlines()[-1]


def test_median_time_waits_for_the_device_before_each_clock_read():
    """On a GPU the step only queues work: `sync` (torch.cuda.synchronize there) runs once the warm-up calls are
    queued, so none of their work is timed, and after every timed call, before the clock stops."""
    from yolokd.bench.overhead import median_time

    calls = []
    median_time(lambda: calls.append("step"), iters=2, warmup=1, sync=lambda: calls.append("sync"))
    assert calls == ["step", "sync", "step", "sync", "step", "sync"]


def test_overhead_is_measured_on_the_profiles_device(tmp_path, monkeypatch):
    """`gains profile=gpu` times the KD step where its runs trained (device=0), not on the CPU; the CPU profiles
    pass device=cpu, which `yolokd overhead` also takes on its command line."""
    import yolokd.bench.overhead as overhead
    from yolokd.bench.gains import overhead_run
    from yolokd.cli import main

    seen = []

    def fake_measure(student, teacher, methods, **kw):
        seen.append(kw["device"])
        return {"student": 1.0, "teacher": 1.0, **{m: 3.0 for m in methods}}

    monkeypatch.setattr(overhead, "measure", fake_measure)
    p = Profile(methods=("dfd",), seeds=(0,), device="0", out=str(tmp_path))
    assert overhead_run(p, {"teacher": {"best": "t.pt"}}) == {"dfd": 1.5} and seen == ["0"]
    assert main(["overhead", "model=yolov8n.yaml", "teacher=yolov8n.yaml", "methods=dfd", "device=0"]) == 0
    assert seen == ["0", "0"]  # an int on the command line, a str for select_device


def test_label_caches_are_written_before_runs_start_side_by_side(tiny_data):
    """Two runs that each find no label cache both write it and one fails on the other's rename: the parent writes
    the train and val caches first."""
    from pathlib import Path

    from yolokd.bench.gains import label_caches

    labels = Path(tiny_data).parent / "labels"
    for cache in labels.glob("*.cache"):
        cache.unlink()
    # a variant's yolokd arguments ride along in train_args; Ultralytics' config must not see them
    label_caches(Profile(data="synthetic-tiny", imgsz=64, fraction=0.5, train_args={"kd_ramp": 0.33}))
    assert (labels / "train.cache").exists() and (labels / "val.cache").exists()


def test_epoch_gains_pair_the_validation_curves_and_are_plotted(tmp_path):
    """The per-epoch gain is the run's val mAP50-95 minus the plain run's of the same seed, epoch by epoch; a run
    whose results.csv is gone gives none, and the panel figure is drawn from what there is."""
    from yolokd.bench.gains import epoch_gains, plot_epochs

    def run(name, maps):
        d = tmp_path / name
        (d / "weights").mkdir(parents=True)
        lines = "".join(f"{e + 1}, {m}, 1.0\n" for e, m in enumerate(maps))
        (d / "results.csv").write_text("epoch, metrics/mAP50-95(B), time\n" + lines)
        return {**rec(maps[-1]), "best": str(d / "weights" / "best.pt")}

    plain, rm = run("plain_s0", [0.1, 0.2, 0.3]), run("rm_s0", [0.1, 0.25, 0.28])
    assert epoch_gains(rm, plain) == pytest.approx([0.0, 0.05, -0.02])  # ahead mid-run, behind at the end
    assert epoch_gains(rm, {**plain, "best": str(tmp_path / "gone" / "weights" / "best.pt")}) == []
    p = Profile(methods=("rm",), seeds=(0,))
    rows = summarize(p, {"teacher": rec(0.5), "plain_s0": plain, "rm_s0": rm})
    assert rows[1]["epoch_gain"] == [pytest.approx([0.0, 0.05, -0.02])]
    plot_epochs(rows, tmp_path / "epochs.png", close_mosaic=1)
    assert (tmp_path / "epochs.png").stat().st_size > 0
    plot_epochs(rows[:1], tmp_path / "none.png")  # only the plain row: nothing to draw, no empty figure
    assert not (tmp_path / "none.png").exists()


def test_a_variant_row_is_paired_with_the_row_as_shipped_where_it_ran(tmp_path):
    """`variant=ramp` rows: their gain over plain, and over the default row of the same seed once that has run for
    every seed (read from its result.json in the same out folder)."""
    p = Profile(methods=("dfd",), seeds=(0, 1), variant="ramp", out=str(tmp_path))
    results = {"teacher": rec(0.5), "plain_s0": rec(0.2), "plain_s1": rec(0.3), "dfd-ramp_s0": rec(0.25),
               "dfd-ramp_s1": rec(0.3)}
    (tmp_path / "dfd_s0").mkdir()
    (tmp_path / "dfd_s0" / "result.json").write_text(json.dumps(rec(0.22)))
    assert "over_part" not in summarize(p, results)[1]  # seed 1 of the default row has not run
    (tmp_path / "dfd_s1").mkdir()
    (tmp_path / "dfd_s1" / "result.json").write_text(json.dumps(rec(0.32)))
    rows = summarize(p, results)
    assert rows[1]["over_part"] == pytest.approx([0.03, -0.02])
    assert "| +0.0050 ± 0.0354 vs dfd as shipped, 1/2 |" in markdown(p, results, rows)
    assert "| dfd-ramp | 0.2750 ± 0.0354 |" in markdown(p, results, rows)  # the row names its variant
    assert "Over its" not in markdown(p, results, rows)  # one row: no pooled line repeating the row's figure


def test_a_variant_is_summed_up_over_its_rows_seed_by_seed(tmp_path):
    """The default-deciding line: per seed, the mean over the variant's rows of its gain over the row as shipped."""
    p = Profile(methods=("dfd", "pgd"), seeds=(0, 1), variant="fade", out=str(tmp_path))
    results = {"teacher": rec(0.5), "plain_s0": rec(0.2), "plain_s1": rec(0.3), "dfd-fade_s0": rec(0.25),
               "dfd-fade_s1": rec(0.3), "pgd-fade_s0": rec(0.21), "pgd-fade_s1": rec(0.34)}
    for name, m in {"dfd_s0": 0.22, "dfd_s1": 0.32, "pgd_s0": 0.20, "pgd_s1": 0.30}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps(rec(m)))
    rows = summarize(p, results)
    # seed 0: dfd +0.03, pgd +0.01 -> +0.02; seed 1: dfd -0.02, pgd +0.04 -> +0.01
    assert variant_gain_per_seed(rows) == pytest.approx([0.02, 0.01])
    # t = sqrt(2) * 0.015 / stdev(0.02, 0.01) = sqrt(2) * 0.015 / 0.00707 = 3.0
    assert ("Over its 2 rows, `fade`'s paired gain over the rows as shipped, averaged over the rows seed by seed: "
            "+0.0200, +0.0100; mean +0.0150 ± 0.0071, 2/2 seeds above, paired t 3.0.") in markdown(p, results, rows)
    assert variant_gain_per_seed(summarize(Profile(methods=("dfd",), seeds=(0, 1), out=str(tmp_path)),
                                           {**results, "dfd_s0": rec(0.22), "dfd_s1": rec(0.32)})) == []


def test_the_null_row_is_plain_nudged_in_lrf_shared_by_every_variant_and_a_second_baseline(tmp_path):
    """The null row: the plain run's arguments with lrf 0.0001 higher, named without the variant (it has no KD
    arguments to vary), never paired with a row "as shipped", and explained under the table; with it, every
    distilled row's gain over the mean of its seed's two baseline runs (plain and null), hand-computed."""
    from ultralytics.utils import DEFAULT_CFG

    p = Profile(methods=("null", "dfd"), seeds=(0, 1), variant="fade", out=str(tmp_path))
    assert (p.run_name("null", 0), p.run_name("dfd", 0)) == ("null_s0", "dfd-fade_s0")
    plain, null = p.run_args(True, epochs=p.epochs, seed=1), p.null_args(1)
    assert null["lrf"] == pytest.approx(DEFAULT_CFG.lrf + 1e-4) and null["seed"] == 1
    assert {k: v for k, v in null.items() if k != "lrf"} == plain and "lrf" not in plain
    assert Profile(train_args={"lrf": 0.2}).null_args(0)["lrf"] == pytest.approx(0.2001)  # nudges the user's lrf
    (tmp_path / "null_s0").mkdir()  # a finished null run must not be taken for the row "as shipped"
    (tmp_path / "null_s0" / "result.json").write_text(json.dumps(rec(0.21)))
    results = {"teacher": rec(0.5), "plain_s0": rec(0.2), "plain_s1": rec(0.3), "null_s0": rec(0.21),
               "null_s1": rec(0.28), "dfd-fade_s0": rec(0.25), "dfd-fade_s1": rec(0.3)}
    rows = {r["student"]: r for r in summarize(p, results)}
    assert rows["null"]["gain"] == pytest.approx([0.01, -0.02]) and "over_part" not in rows["null"]
    md = markdown(p, results, list(rows.values()))
    assert "| null | 0.2450 ± 0.0495 |" in md and "null: the plain student with the final learning-rate" in md
    # against both baseline runs: (0.2 + 0.21) / 2 = 0.205 and (0.3 + 0.28) / 2 = 0.29, so dfd gains +0.045, +0.010;
    # mean 0.0275, sd 0.035 / sqrt(2) = 0.0247, t = sqrt(2) * 0.0275 / 0.0247 = 1.6
    assert rows["dfd"]["gain_baselines"] == pytest.approx([0.045, 0.01]) and "gain_baselines" not in rows["null"]
    assert "| dfd-fade | +0.0275 ± 0.0247 | 2/2 | 1.6 |" in md and "| null | +0." not in md.split("Against both")[1]
    no_null = Profile(methods=("dfd",), seeds=(0, 1), variant="fade", out=str(tmp_path))
    md = markdown(no_null, results, summarize(no_null, results))
    assert "null:" not in md and "Against both" not in md


@pytest.mark.parametrize("n_rows,n_seeds", [(1, 5), (2, 5), (12, 5), (1, 15)])
def test_gain_figure_title_fits_however_few_rows_or_many_seeds(n_rows, n_seeds):
    """With one or two rows the figure once was narrower than its title, which came out cut off; with 15 seeds
    listed one by one, too."""
    import matplotlib.pyplot as plt

    from yolokd.bench.gains import gain_figure

    rows = [{"student": "plain", "label": "plain", "gain": []}] + [
        {"student": f"m{i}", "label": f"m{i}", "gain": [0.01, -0.02, 0.03, 0.0, 0.02][:n_seeds]} for i in range(n_rows)]
    fig = gain_figure(rows, seeds=tuple(range(n_seeds)))
    renderer = fig.canvas.get_renderer()
    title, page = fig.axes[0].title.get_window_extent(renderer), fig.bbox
    assert page.x0 <= title.x0 and title.x1 <= page.x1 and title.y1 <= page.y1
    plt.close(fig)


def test_seed_ranges_in_titles():
    from yolokd.bench.gains import seed_ranges

    assert seed_ranges((0, 1, 2)) == "0–2" and seed_ranges(tuple(range(15))) == "0–14"
    assert seed_ranges((4, 0, 1, 7, 9, 10, 11)) == "0, 1, 4, 7, 9–11" and seed_ranges((3,)) == "3"


def test_a_fade_variant_forks_where_it_starts_to_differ():
    from yolokd.bench.gains import fork_epoch

    fade = Profile(epochs=30, variant="f", train_args={"kd_fade": 0.33})
    assert fork_epoch(fade, "dfd") == 20  # factor (29 - 19) / 9.9 >= 1 at epoch index 19, 9 / 9.9 < 1 at 20
    assert fork_epoch(replace(fade, epochs=8, train_args={"kd_fade": 0.5}), "dfd") == 4  # 4 at 1, then 0.75, ...
    assert fork_epoch(replace(fade, variant=""), "dfd") == 0  # not a variant: nothing to pair
    assert fork_epoch(replace(fade, train_args={"kd_fade": 0}), "dfd") == 0
    assert fork_epoch(replace(fade, train_args={"kd_fade": 0.33, "kd_ramp": 0.2}), "dfd") == 0  # differs from epoch 1
    # rm and rmpfi fade on their own from epoch index 15 ((29 - 15) / 15 < 1): a variant of 0.33 differs from there
    # on, one of 0 (their constant weights) too, and one of 0.5 never (the row as shipped again: trained whole)
    assert fork_epoch(fade, "rmpfi") == fork_epoch(fade, "rmpfi+ld") == fork_epoch(fade, "rm+ld") == 15
    assert fork_epoch(replace(fade, train_args={"kd_fade": 0}), "rmpfi") == 15
    assert fork_epoch(replace(fade, train_args={"kd_fade": 0.5}), "rmpfi") == 0
    assert fork_epoch(fade, "ld") == 0  # no capped term: a fade changes nothing


@pytest.mark.slow
def test_two_runs_resumed_from_one_fork_are_one_computation(tmp_path, tiny_data):
    """A run paused at epoch 1 and a copy of it forked there, with no argument changed, resume to the same epoch 2:
    what makes a fork's pair differ is the variant's arguments alone."""
    from yolokd.bench.gains import epochs_done, fork_run, train_run

    args = dict(data=tiny_data, epochs=2, imgsz=64, batch=8, workers=0, device="cpu", plots=False, exist_ok=True,
                project=str(tmp_path), verbose=False, seed=0, deterministic=True)
    assert train_run("a", "yolov8n.yaml", args, pause_at=1) is None and epochs_done(tmp_path / "a") == 1
    assert train_run("a", "yolov8n.yaml", args, pause_at=1) is None  # holds epoch 1 already: not touched
    fork_run(tmp_path / "a", tmp_path / "b", {})
    b, a = train_run("b", "yolov8n.yaml", args), train_run("a", "yolov8n.yaml", args)
    assert b["map50_95"] == a["map50_95"]
    rows = {r: (tmp_path / r / "results.csv").read_text().splitlines() for r in "ab"}
    assert len(rows["a"]) == 3 and rows["a"][:2] == rows["b"][:2]  # epoch 1: copied
    drop_time = [",".join(c for i, c in enumerate(line.split(",")) if i != 1) for line in (rows["a"][2], rows["b"][2])]
    assert drop_time[0] == drop_time[1]  # epoch 2: trained apart, the same to the last digit (but the clock)
    assert "save_dir" in (tmp_path / "b" / "args.yaml").read_text() and str(tmp_path / "b") in (
        tmp_path / "b" / "args.yaml").read_text()


@pytest.mark.slow
def test_a_fade_variant_is_trained_from_its_shipped_runs_fork(tmp_path, tiny_data):
    import yaml

    p = Profile(data=tiny_data, methods=("pfi",), seeds=(0,), epochs=3, teacher_epochs=1, imgsz=64, batch=8,
                out=str(tmp_path / "bench"), variant="fade", train_args={"kd_fade": 0.33})  # fades from epoch 3
    md = bench(p)
    shipped, faded = (md.parent / n for n in ("pfi_s0", "pfi-fade_s0"))
    rows = [(r / "results.csv").read_text().splitlines() for r in (shipped, faded)]
    assert len(rows[0]) == len(rows[1]) == 4 and rows[0][:3] == rows[1][:3]  # epochs 1-2 trained once
    head = rows[0][0].split(",")
    kd_loss = [float(r[3].split(",")[head.index("train/kd_loss")]) for r in rows]
    assert kd_loss[0] > 0 and kd_loss[1] == 0  # epoch 3: faded to 0 in the variant only
    time = [[float(line.split(",")[1]) for line in r[1:]] for r in rows]
    assert all(t[2] < t[1] for t in time)  # both resumed at epoch 3 (Ultralytics restarts the clock)
    args = [yaml.safe_load((r / "args.yaml").read_text()) for r in (shipped, faded)]  # as resumed
    assert (args[0].get("kd_fade"), args[1]["kd_fade"], args[1]["name"]) == (None, 0.33, "pfi-fade_s0")
    assert "vs pfi as shipped, 0/1" in md.read_text() or "vs pfi as shipped, 1/1" in md.read_text()
