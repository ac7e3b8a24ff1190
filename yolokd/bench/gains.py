"""Proof of gains: `yolokd gains` (earlier name `yolokd bench`) trains a teacher, the plain student and every distilled student, over seeds.

From nothing, on one machine: generate the data (default `data=synthetic`), train the teacher once, then for each
seed the plain student and one distilled student per method, all with the same schedule, augmentation and seed,
so each distilled run is paired with the plain run of its seed. It reports mAP50-95 and mAP50 (mean +- std over
seeds), the paired gain over the plain student, the share of the teacher-student gap closed
`(distilled - plain) / (teacher - plain)`, and the training time per epoch, as Markdown + JSON + a plot.

Every run lives in `out/<run>/`; a finished run leaves `out/<run>/result.json` and is skipped next time, an
interrupted one (a `weights/last.pt` but no result) is resumed. So re-running the same command continues. Each
result records the code version that trained it, and the table names the command and the code version(s) above it,
so a table stitched from runs of different code versions says so.

    yolokd gains profile=scratch       # the main profile: students from scratch, Ultralytics' schedule, 30 epochs
    yolokd gains profile=demo          # the README's quick demo: teacher, plain and ld students, one seed
    yolokd gains                       # the short warm-start CPU profile (see PROFILES)
    yolokd gains profile=gpu data=VOC.yaml device=0
    yolokd gains profile=scratch methods=dfd,pgd kd_max_ratio=0 variant=nocap   # a yolokd-argument variant

The row `null` is the plain student again, nudged where it cannot matter (`null_args`): its paired gain over plain
is what run-to-run noise alone gives once a run leaves its plain run's trajectory, which every distillation term
does. A method whose gains spread like the null row's is not told apart from plain by its paired t on a few seeds.
With the null row, each distilled row is also compared with the mean of the plain and null runs of its seed
(`baseline_map`): the plain student trained twice, a baseline with half the run-to-run variance of one run.

A variant whose only yolokd argument is `kd_fade` is the same computation as the rows as shipped until a fade
begins (the variant's, or a method's own: `method_fade`), so its command trains each pair once up to there: the
shipped run is paused at that epoch, the variant's run forked from its checkpoint, and both resumed
(`train_forked`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ultralytics.utils import DEFAULT_CFG, LOGGER, colorstr

from yolokd.data.synthetic import resolve_data


@dataclass
class Profile:
    """One benchmark setting. Every field can be overridden on the command line (`epochs=20 seeds=0,1`)."""

    data: str = "synthetic"
    teacher_model: str = "yolov8s.yaml"
    student_model: str = "yolov8n.yaml"
    methods: tuple[str, ...] = ("fitnet", "ultralytics", "dfd", "pdf", "rm", "pfi", "rmpfi", "pgd", "dicod", "ld",
                                "dfd+ld")  # the last: the best composition measured (docs/experiments.md)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 12
    teacher_epochs: int = 30
    student_init_epochs: int = 0  # >0: every student starts from one plain student trained this long (warm start)
    cls_teacher_epochs: int = 10  # DICOD's classifier teacher (yolov8n-cls on GT crops at 64 px)
    jobs: int = 1  # student runs trained in parallel (Ultralytics uses one CPU thread per process on 2 cores)
    imgsz: int = 128
    batch: int = 16
    fraction: float = 1.0  # share of the train images every run (teacher, classifier teacher, students) trains on
    device: str = "cpu"
    out: str = "runs/bench"
    variant: str = ""  # suffix of the distilled runs' names, for a variant of yolokd arguments in the same out folder
    student_args: dict = field(default_factory=dict)  # train arguments of the compared (plain and distilled) runs
    train_args: dict = field(default_factory=dict)  # any other Ultralytics / yolokd train arguments (every run)

    def run_args(self, compared: bool = False, **extra) -> dict:
        """Train arguments of one run: the profile's, then (for the compared student runs) `student_args`, then
        `train_args` (the command line's), then the run's own (`extra`)."""
        args = dict(data=resolve_data(self.data), imgsz=self.imgsz, batch=self.batch, device=self.device, workers=0,
                    plots=False, exist_ok=True, project=str(Path(self.out).resolve()), verbose=False)
        if self.fraction < 1:
            args["fraction"] = self.fraction
        return {**args, **(self.student_args if compared else {}), **self.train_args, **extra}

    def row_label(self, method: str) -> str:
        """`dfd`, or with a variant `dfd-nocap` (plain and null runs are shared by every variant): a row's name in the
        table and the figures, and its runs' names before the seed."""
        return f"{method}-{self.variant}" if self.variant and method not in UNDISTILLED else method

    @property
    def needs_cls_teacher(self) -> bool:
        """Whether a row distils with DICOD (alone or composed), which needs the classifier teacher."""
        return any("dicod" in m.split("+") for m in self.methods)

    def run_name(self, method: str, seed: int) -> str:
        """`plain_s0`, `dfd_s0`, or with a variant `dfd-nocap_s0`."""
        return f"{self.row_label(method)}_s{seed}"

    def null_args(self, seed: int) -> dict:
        """Train arguments of the null row's run: the plain run's, with the final learning-rate fraction `lrf` 0.0001
        higher (0.01 -> 0.0101 as shipped: the last epoch's learning rate about 1 % higher). That cannot matter in
        expectation, yet the run's losses differ from plain's from its 3rd epoch on; a smaller nudge (weight_decay
        x 1.001) is lost in float32 rounding: that run stayed identical to plain."""
        plain = self.run_args(True, epochs=self.epochs, seed=seed)
        return {**plain, "lrf": float(plain.get("lrf", DEFAULT_CFG.lrf)) + NULL_LRF_STEP}


NULL_ROW = "null"  # the plain student nudged where it cannot matter: its paired gain is run-to-run noise alone
NULL_LRF_STEP = 1e-4  # how much higher the null row's runs set `lrf`
UNDISTILLED = ("plain", NULL_ROW)  # rows without a teacher: shared by every variant, no KD step to time


# A 4-epoch run with Ultralytics' defaults takes one optimizer step per 64 images (nbs=64) and spends 3 epochs
# warming up: at 800 images that is 50 steps, most of them at a fraction of the learning rate. The CPU profile's
# compared runs step every batch and warm up for one epoch, so the students (plain and distilled alike) train.
SHORT_SCHEDULE = {"nbs": 16, "warmup_epochs": 1}

PROFILES = {
    # The main profile, as users train: every student from yolov8n.yaml (no warm start), Ultralytics' own schedule
    # (nbs=64, 3 warm-up epochs, close_mosaic=10, optimizer=auto), 30 epochs, 3 seeds; the teacher (yolov8s, 60
    # epochs) and the classifier teacher (30 epochs: 10 left it at 45 % top-1) on the same 480 train images (the
    # first 60 % of data=synthetic), imgsz 128. Measured on a 2-core CPU with two runs at a time: teacher 24 min,
    # plain students 5.5 min, distilled students 13-14 min each, so about 5.5 hours in all (more than the 3 hours
    # aimed at), plus 3 plain-cost runs for the null row (the noise floor); it resumes where it stopped.
    "scratch": Profile(methods=(NULL_ROW, "ultralytics", "ld", "dfd", "pdf", "rm", "pfi", "rmpfi", "pgd", "dicod",
                                "dfd+ld", "pdf+ld", "rm+ld", "pfi+ld", "rmpfi+ld", "pgd+ld", "dicod+ld"),
                       seeds=(0, 1, 2), epochs=30, teacher_epochs=60, cls_teacher_epochs=30, imgsz=128,
                       fraction=0.6, jobs=2, out="runs/bench-scratch"),
    # 2-core CPU, about 90 min: warm-started students, two runs at a time (one thread each).
    "cpu": Profile(seeds=(0, 1), epochs=4, teacher_epochs=20,
                   student_init_epochs=10, imgsz=160, jobs=2, student_args=SHORT_SCHEDULE),
    # The longer CPU profile of docs/experiments.md: 8 student epochs, 3 seeds, about 2 h 15 min on 2 cores. Its own
    # out folder (its runs share names with the cpu profile's); copy teacher/, student_init/ and cls_teacher/ in from
    # a finished cpu profile to skip the first half hour.
    "cpu8": Profile(seeds=(0, 1, 2), epochs=8, teacher_epochs=20, student_init_epochs=10, imgsz=160, jobs=2,
                    student_args=SHORT_SCHEDULE, out="runs/bench-8ep"),
    # The README's main job: the cpu profile's teacher and warm start, then the plain and the ld student (its runs
    # are the cpu profile's, so `yolokd gains` afterwards reuses them).
    "demo": Profile(methods=("ld",), seeds=(0,), epochs=4, teacher_epochs=20, student_init_epochs=10, imgsz=160,
                    jobs=2, student_args=SHORT_SCHEDULE),
    "gpu": Profile(teacher_model="yolov8l.yaml", student_model="yolov8n.yaml", seeds=(0, 1, 2), epochs=100,
                   teacher_epochs=200, imgsz=640, batch=32, device="0", out="runs/bench-gpu"),
}


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The yolokd code that runs: `git describe` of its source checkout (`-dirty` with uncommitted changes), or the
    package version when it is not a git checkout."""
    from yolokd import __version__

    src = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(src), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else __version__
    except (OSError, subprocess.SubprocessError):
        return __version__


def read_column(run: Path, column: str) -> list[float]:
    """One column of a run's results.csv, one value per epoch (empty when the run did not log it)."""
    rows = [r.split(",") for r in (run / "results.csv").read_text().strip().splitlines()]
    head = [h.strip() for h in rows[0]]
    return [float(r[head.index(column)]) for r in rows[1:]] if column in head else []


def mean_column(run: Path, column: str) -> float:
    """Mean over the epochs of one results.csv column (NaN when the run did not log it)."""
    values = read_column(run, column)
    return statistics.mean(values) if values else math.nan


def train_run(name: str, model: str, args: dict, detector: bool = True, pause_at: int = 0) -> dict | None:
    """Train (or resume, or skip) one run and return its result record (`detector=False`: a classifier).

    `pause_at=E`: stop once `weights/last.pt` holds epoch E (the run is left to be resumed, as if killed there) and
    return None; a run that already holds E is not touched (`train_forked`)."""
    from ultralytics import YOLO

    from yolokd.trainer import DistillationTrainer

    trainer = DistillationTrainer if detector else None
    run = Path(args["project"]) / name
    finished = _finished(args["project"], name)
    if finished:
        return finished
    last = run / "weights" / "last.pt"
    if pause_at and epochs_done(run) >= pause_at:
        return None
    yolo = YOLO(str(last) if last.exists() else model)
    if pause_at:
        yolo.add_callback("on_model_save", functools.partial(_pause_at, pause_at))
    LOGGER.info(f"{colorstr('bench:')} {'resuming' if last.exists() else 'training'} {name}"
                + (f" to epoch {pause_at}" if pause_at else ""))
    try:
        yolo.train(trainer=trainer, **({"resume": True} if last.exists() else {"name": name, **args}))
    except PausedAtFork:
        return None
    metrics = yolo.trainer.metrics or {}
    result = {
        "run": name,
        "map50_95": float(metrics.get("metrics/mAP50-95(B)", 0.0)),
        "map50": float(metrics.get("metrics/mAP50(B)", 0.0)),
        "top1": float(metrics.get("metrics/accuracy_top1", 0.0)),
        "sec_per_epoch": epoch_seconds(run),
        "kd_scale": mean_column(run, "train/kd_scale"),  # the cap's mean factor (NaN: never capped)
        "best": str(run / "weights" / "best.pt"),
        "code": code_version(),
    }
    (run / "result.json").write_text(json.dumps(result, indent=2))
    return result


class PausedAtFork(Exception):
    """Raised by `_pause_at` to stop a run whose `weights/last.pt` holds the fork epoch (`train_run(pause_at=)`)."""


def _pause_at(epoch: int, trainer) -> None:
    """`on_model_save` callback (called once last.pt is written): stop the run once it holds `epoch` epochs."""
    if trainer.epoch + 1 >= epoch:
        raise PausedAtFork


def epochs_done(run: Path) -> int:
    """Epochs the run's `weights/last.pt` holds (0 without one; Ultralytics marks a finished run's with -1, so 0)."""
    import torch

    last = run / "weights" / "last.pt"
    return int(torch.load(last, map_location="cpu", weights_only=False)["epoch"]) + 1 if last.exists() else 0


def fork_epoch(p: Profile, method: str) -> int:
    """The first epoch in which a variant's run of `method` differs from the row as shipped, where the two are the
    same computation before it; 0 where they differ from the start (or never: then there is nothing to share).

    That is the case for a variant whose only yolokd argument is `kd_fade`: the schedule factor of each of the
    method's capped parts (`schedule_factor`) is, in both runs, 1 until a fade begins, the variant's (`kd_fade`) or
    the part's own (`method_fade`), e.g. 20 with `kd_fade=0.33` over 30 epochs where the row as shipped does not
    fade."""
    from yolokd.config import method_fade, split_kd_args
    from yolokd.criterion import schedule_factor
    from yolokd.methods.base import get_method, parse_methods

    kd = split_kd_args(p.train_args)[1] if p.variant else {}
    if set(kd) != {"kd_fade"}:
        return 0
    faded = [m for m in parse_methods(method) if get_method(m).task_scaled is not True]  # parts with capped terms

    def factors(args: dict, e: int) -> list[float]:
        return [schedule_factor(e, p.epochs, 0.0, method_fade(m, args)) for m in faded]

    return next((e for e in range(p.epochs) if factors({}, e) != factors(kd, e)), 0)


def fork_run(src: Path, dst: Path, kd_args: dict) -> None:
    """Start run `dst` as a copy of run `src` at its last checkpoint, with the yolokd arguments `kd_args`: src's
    results.csv and weights (best.pt, last.pt and the adapters' kd_state.pt) are copied, and the checkpoints'
    recorded arguments get dst's name and folder and `kd_args`, which a resume of dst then trains with. last.pt is
    written last, so a fork cut off midway is done again."""
    import torch

    from yolokd.trainer import KD_STATE

    (dst / "weights").mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "results.csv", dst / "results.csv")
    if (src / "weights" / KD_STATE).exists():
        shutil.copy2(src / "weights" / KD_STATE, dst / "weights" / KD_STATE)
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(src / "weights" / name, map_location="cpu", weights_only=False)
        ckpt["train_args"] = {**ckpt["train_args"], **kd_args, "name": dst.name, "save_dir": str(dst)}
        tmp = dst / "weights" / f".{name}.tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, dst / "weights" / name)


def train_forked(shipped: str, variant: str, model: str, shipped_args: dict, variant_args: dict, fork: int) -> dict:
    """A variant's run and its row's shipped run of the same seed, where the two are one computation for the first
    `fork` epochs (`fork_epoch`): trained once up to there, then apart. Returns the variant's record.

    The shipped run is trained to epoch `fork` and paused, the variant forked from its checkpoint (`fork_run`) and
    both resumed. A resumed run is not bit-identical to an uninterrupted one (Ultralytics resumes from the EMA
    weights, with its random streams restarted), so both are resumed from the same checkpoint: they then differ by
    the variant's arguments alone, for 1 + (epochs - fork) / epochs runs' time instead of 2. Where the shipped run
    is past `fork` already (or finished), the variant is trained whole, as any variant."""
    from yolokd.config import split_kd_args

    project = Path(shipped_args["project"])
    started = _finished(project, variant) or (project / variant / "weights" / "last.pt").exists()
    if not started:
        train_run(shipped, model, shipped_args, pause_at=fork)  # skips a finished run, leaves one past `fork`
        if epochs_done(project / shipped) == fork:  # not past it, nor finished, nor saving no last.pt (save=False)
            fork_run(project / shipped, project / variant, split_kd_args(variant_args)[1])
    result = train_run(variant, model, variant_args)
    train_run(shipped, model, shipped_args)
    return result


def label_caches(p: Profile) -> None:
    """Ultralytics' label caches of the profile's train and val splits, written once here, before runs start side by
    side: two runs that find no valid cache both write it, and one of them fails on the other's rename."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset

    from yolokd.config import split_kd_args
    from yolokd.data.checks import load_dataset

    args, _ = split_kd_args(p.run_args())  # Ultralytics' own config refuses yolokd's keys (a variant's kd_ramp=...)
    data = load_dataset(args["data"])
    cfg = get_cfg(overrides={k: v for k, v in args.items() if k not in {"project", "exist_ok"}})
    for split in ("train", "val"):  # the dataset's constructor scans the labels and saves the cache
        build_yolo_dataset(cfg, data[split], p.batch, data, mode=split)


def run_all(p: Profile) -> dict:
    """Teacher once, then plain + each method for each seed. Returns {"teacher": rec, run_name: rec, ...}.

    `p.jobs` runs at a time, each in its own process. Runs start as soon as what they need exists: the teacher,
    the classifier teacher (DICOD) and the plain students (after the warm start, if any) from the beginning, the
    distilled students once the teachers are trained. A variant that changes the runs only from some epoch on
    (`fork_epoch`) trains each of its runs with its row's shipped run of the same seed (`train_forked`)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from yolokd.config import split_kd_args

    label_caches(p)
    results = {}
    with ProcessPoolExecutor(p.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_exit_with_parent) as pool:
        teacher_job = pool.submit(train_run, "teacher", p.teacher_model, p.run_args(epochs=p.teacher_epochs, seed=0))
        cls_teacher_job = pool.submit(cls_teacher_run, p) if p.needs_cls_teacher else None
        student = p.student_model
        if p.student_init_epochs > 0:  # distil into an already (pre)trained student
            results["student_init"] = pool.submit(train_run, "student_init", student,
                                                  p.run_args(epochs=p.student_init_epochs, seed=0)).result()
            student = results["student_init"]["best"]
        jobs = {name: pool.submit(train_run, name, student, p.run_args(True, epochs=p.epochs, seed=s))
                for s in p.seeds for name in [p.run_name("plain", s)]}
        if NULL_ROW in p.methods:
            jobs.update({name: pool.submit(train_run, name, student, p.null_args(s))
                         for s in p.seeds for name in [p.run_name(NULL_ROW, s)]})
        results["teacher"] = teacher_job.result()
        cls_teacher = cls_teacher_job.result() if cls_teacher_job else None
        if cls_teacher:
            results["cls_teacher"] = {"best": cls_teacher}
        distilled = [m for m in p.methods if m != NULL_ROW]  # the null row's runs were submitted with plain's
        shipped = replace(p, variant="", train_args=split_kd_args(p.train_args)[0])  # the rows without the variant
        for s in p.seeds:
            for m in distilled:
                extra = {"cls_teacher": cls_teacher} if "dicod" in m.split("+") else {}
                args, shipped_args = (q.run_args(True, epochs=p.epochs, seed=s, teacher=results["teacher"]["best"],
                                                 method=m, **extra) for q in (p, shipped))
                name, fork = p.run_name(m, s), fork_epoch(p, m)
                jobs[name] = (pool.submit(train_forked, shipped.run_name(m, s), name, student, shipped_args, args, fork)
                              if fork else pool.submit(train_run, name, student, args))
        results.update({name: job.result() for name, job in jobs.items()})
    return results


def finished_results(p: Profile) -> dict:
    """`report=true`: the records `run_all` would return, read from the out folder's finished runs; nothing is
    trained. Raises `DistillationConfigError` naming each run in progress with the epochs it holds, and how many
    have not started (the first few by name)."""
    from yolokd.config import DistillationConfigError

    shared = ["teacher", *(["student_init"] if p.student_init_epochs > 0 else []),
              *(["cls_teacher"] if p.needs_cls_teacher else [])]
    per_seed = {s: [p.run_name(m, s) for m in ("plain", *p.methods)] for s in p.seeds}
    results = {name: _finished(p.out, name) for name in [*shared, *(n for names in per_seed.values() for n in names)]}
    epochs = {name: epochs_done(Path(p.out) / name) for name, rec in results.items() if rec is None}
    if epochs:
        started = [f"{name} ({n} epochs)" for name, n in epochs.items() if n]
        waiting = [name for name, n in epochs.items() if not n]
        parts = [f"not finished: {', '.join(started)}"] if started else []
        if waiting:  # a long profile has dozens: the first few name where it will go on
            parts.append(f"{len(waiting)} not started ({', '.join(waiting[:3])}{', ...' if len(waiting) > 3 else ''})")
        shared_done = all(results[n] for n in shared)
        done = [str(s) for s, names in per_seed.items() if shared_done and all(results[n] for n in names)]
        hint = ""
        if done:
            hint = f" Every run of seeds {','.join(done)} has finished: add seeds={','.join(done)} for their table."
        raise DistillationConfigError(f"report=true writes the table from finished runs only; in {p.out}, "
                                      f"{'; '.join(parts)}. Run the same command without report=true to train "
                                      f"them.{hint}")
    if "cls_teacher" in results:  # as `run_all` gives it: the checkpoint only (its accuracy is not a row)
        results["cls_teacher"] = {"best": results["cls_teacher"]["best"]}
    return results


def _exit_with_parent() -> None:
    """Pool initializer: on Linux a worker is killed with the bench process, so that a bench killed and started
    again never has two processes training into one run folder. Elsewhere a no-op."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def cls_teacher_run(p: Profile) -> str:
    """DICOD's classifier teacher, made as `cls_teacher=auto` makes it (`methods.dicod`: the same crops, model and
    crop size) but for the profile's `cls_teacher_epochs`, as one of the benchmark's resumable runs."""
    from yolokd.methods.dicod import CLS_TEACHER_MODEL, DEFAULT_CROP, cls_teacher_crops

    crops = cls_teacher_crops(resolve_data(p.data), Path(p.out).resolve() / "crops", fraction=p.fraction)
    args = p.run_args(epochs=p.cls_teacher_epochs, seed=0, imgsz=DEFAULT_CROP)
    args["data"] = str(crops)
    args.pop("fraction", None)  # the crops already come from the profile's share of the train images
    return train_run("cls_teacher", CLS_TEACHER_MODEL, args, detector=False)["best"]


def overhead_run(p: Profile, results: dict) -> dict[str, float]:
    """KD step overhead per method, `yolokd overhead` on the benchmark's own student, teacher and classifier, on
    the profile's device (on the CPU with one thread, as the benchmark's runs use). Cached in out/overhead.json;
    `ultralytics` is not timed (it runs inside Ultralytics' own loss)."""
    from yolokd.bench.overhead import measure

    cache = Path(p.out) / "overhead.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [m for m in p.methods if m not in done and m not in ("ultralytics", *UNDISTILLED)]
    if todo:
        import torch

        student = results.get("student_init", {}).get("best", p.student_model)
        cls_teacher = results.get("cls_teacher", {}).get("best")
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if p.jobs > 1 else threads)
        try:
            times = measure(student, results["teacher"]["best"], todo, imgsz=p.imgsz, batch=p.batch, device=p.device,
                            **p.train_args, **({"cls_teacher": cls_teacher} if cls_teacher else {}))
        finally:
            torch.set_num_threads(threads)
        base = times["student"] + times["teacher"]
        done.update({m: times[m] / base for m in todo})
        cache.write_text(json.dumps(done, indent=2))
    return done


def _mean_std(xs: list[float], sign: str = "") -> str:
    """`mean ± std` with 4 decimals (`sign="+"`: the mean always signed, for gains)."""
    mean = f"{statistics.mean(xs):{sign}.4f}"
    return f"{mean} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else mean


def paired_t(gains: list[float]) -> float:
    """Mean paired gain over its standard error, sqrt(n) * mean / std (NaN below 2 seeds or with no spread)."""
    if len(gains) < 2 or statistics.stdev(gains) == 0:
        return math.nan
    return math.sqrt(len(gains)) * statistics.mean(gains) / statistics.stdev(gains)


def epoch_seconds(run: Path) -> float:
    """Mean wall time per epoch from results.csv's `time` column. Ultralytics restarts that clock when a run is
    resumed, so an epoch whose time is below the previous one's counts from zero."""
    times = read_column(run, "time")
    spans = [t - prev if t >= prev else t for prev, t in zip([0.0, *times], times)]
    return statistics.mean(spans) if spans else math.nan


def _run_dir(rec: dict) -> Path | None:
    """The folder of the run a result record belongs to, where its results.csv still exists."""
    run = Path(rec.get("best", "")).parents[1] if rec.get("best") else None
    return run if run and (run / "results.csv").exists() else None


def _sec_per_epoch(rec: dict) -> float:
    """A run's seconds per epoch, from its own results.csv where it still exists (records of resumed runs written by
    earlier code divided the time since the resume by all epochs)."""
    run = _run_dir(rec)
    return epoch_seconds(run) if run else rec["sec_per_epoch"]


def epoch_gains(rec: dict, plain: dict) -> list[float]:
    """The paired gain at every epoch: the run's validation mAP50-95 minus the plain run's, epoch by epoch, from
    their results.csv (empty where either is missing). Shows when a lead is built and when it is lost."""
    runs = _run_dir(rec), _run_dir(plain)
    if None in runs:
        return []
    ours, base = (read_column(r, "metrics/mAP50-95(B)") for r in runs)
    return [a - b for a, b in zip(ours, base)]


def summarize(p: Profile, results: dict, overhead: dict[str, float] | None = None) -> list[dict]:
    """One row per student kind: metrics over seeds, the paired comparison with the plain student, the cap's mean
    scale factor (`kd_scale`, where a term was capped) and the KD step overhead (`overhead_run`) where measured."""
    t = results["teacher"]
    plain = {s: results[p.run_name("plain", s)] for s in p.seeds}
    baselines = {s: baseline_map(p, results, s) for s in p.seeds} if NULL_ROW in p.methods else None
    as_shipped = replace(p, variant="")  # a variant row's runs without the variant: the same seeds' default runs
    rows = []
    for kind in ("plain", *p.methods):
        recs = {s: results[p.run_name(kind, s)] for s in p.seeds}
        gains = [recs[s]["map50_95"] - plain[s]["map50_95"] for s in p.seeds]
        gaps = [g / (t["map50_95"] - plain[s]["map50_95"]) for g, s in zip(gains, p.seeds)
                if t["map50_95"] - plain[s]["map50_95"] > 1e-6]
        scales = [recs[s].get("kd_scale", math.nan) for s in p.seeds]
        rows.append({
            "student": kind,
            "label": p.row_label(kind),
            "map50_95": [recs[s]["map50_95"] for s in p.seeds],
            "map50": [recs[s]["map50"] for s in p.seeds],
            "gain": gains,
            "gap_closed": statistics.mean(gaps) if gaps else math.nan,
            "wins": sum(g > 0 for g in gains),
            "t": paired_t(gains),
            "sec_per_epoch": statistics.mean(_sec_per_epoch(recs[s]) for s in p.seeds),
            "kd_scale": math.nan if any(math.isnan(x) for x in scales) else statistics.mean(scales),
            "overhead": (overhead or {}).get(kind, math.nan),
            "epoch_gain": [epoch_gains(recs[s], plain[s]) for s in p.seeds],
        })
        part = kind.split("+")[-1]  # a composition "dfd+ld": its gain over its last part's own row, paired
        if "+" in kind and part in p.methods:
            rows[-1]["over_part"] = [recs[s]["map50_95"] - results[p.run_name(part, s)]["map50_95"] for s in p.seeds]
            rows[-1]["over_label"] = part
        variant_row = p.variant and kind not in UNDISTILLED
        default = [_finished(p.out, as_shipped.run_name(kind, s)) for s in p.seeds] if variant_row else [None]
        if None not in default:  # a variant row: its gain over the default row of the same seed, where that ran
            rows[-1]["over_part"] = [recs[s]["map50_95"] - d["map50_95"] for s, d in zip(p.seeds, default)]
            rows[-1]["over_label"] = f"{kind} as shipped"
        if baselines and kind not in UNDISTILLED:
            rows[-1]["gain_baselines"] = [recs[s]["map50_95"] - baselines[s] for s in p.seeds]
    return rows


def baseline_map(p: Profile, results: dict, seed: int) -> float:
    """The mean mAP50-95 of the two baseline runs of `seed`, plain and null: the same plain student trained twice
    (the null run's nudge cannot matter in expectation), so a gain over it carries half of one baseline run's
    run-to-run variance. Costs a plain run per seed, under half a distilled one."""
    return statistics.mean(results[p.run_name(kind, seed)]["map50_95"] for kind in UNDISTILLED)


def variant_gain_per_seed(rows: list[dict]) -> list[float]:
    """A variant's paired gain over the rows as shipped, averaged over its rows seed by seed (empty where no row has
    its shipped runs): the figure that decides whether the variant should become the default for every row."""
    shipped = [r["over_part"] for r in rows if r.get("over_label", "").endswith(" as shipped")]
    return [statistics.mean(col) for col in zip(*shipped)] if shipped else []


def _finished(out: str, name: str) -> dict | None:
    """The result record of a finished run in the out folder, or None."""
    done = Path(out) / name / "result.json"
    return json.loads(done.read_text()) if done.exists() else None


def code_versions(results: dict) -> list[str]:
    """The distinct code versions the runs of `results` were trained with ("unrecorded" for older runs)."""
    return sorted({r.get("code", "unrecorded") for r in results.values() if "map50_95" in r or "top1" in r})


def markdown(p: Profile, results: dict, rows: list[dict], command: str | None = None) -> str:
    """The benchmark table (Markdown): the command and code version(s) that produced it, the setting, the rows."""
    t = results["teacher"]
    codes = code_versions(results)
    head = (
        (f"`{command}`\n\n" if command else "")
        + f"Code: {', '.join(f'`{c}`' for c in codes)}"
        + (" (**runs of several code versions**)" if len(codes) > 1 else "") + ".\n"
        f"Teacher {p.teacher_model} ({p.teacher_epochs} epochs): mAP50-95 {t['map50_95']:.4f}, mAP50 {t['map50']:.4f}. "
        + (f"Students start from a plain {p.student_model} trained {p.student_init_epochs} epochs (mAP50-95 "
           f"{results['student_init']['map50_95']:.4f}). " if "student_init" in results else
           f"Students start from {p.student_model} (random init). ")
        + f"Students {p.student_model}, {p.epochs} epochs, imgsz {p.imgsz}, batch {p.batch}, data {p.data}"
        + (f" (fraction {p.fraction} of the train images)" if p.fraction < 1 else "")
        + f", seeds {list(p.seeds)}, device {p.device}"
        + "".join(f", {k}={v}" for k, v in {**p.student_args, **p.train_args}.items()) + ".\n\n"
        "| student | mAP50-95 | mAP50 | gain vs plain (paired) | wins | paired t | gap closed | vs its last part "
        "(paired) | cap scale | s/epoch "
        "| KD step overhead |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        base = r["student"] == "plain"
        gain = "—" if base else _mean_std(r["gain"], "+")
        wins = "—" if base else f"{r['wins']}/{len(p.seeds)}"
        tt = "—" if base or math.isnan(r.get("t", math.nan)) else f"{r['t']:.1f}"
        gap = "—" if base or math.isnan(r["gap_closed"]) else f"{100 * r['gap_closed']:.1f} %"
        scale = "—" if math.isnan(r.get("kd_scale", math.nan)) else f"{r['kd_scale']:.2f}"
        over = "—" if math.isnan(r.get("overhead", math.nan)) else f"{r['overhead']:.2f}"
        over_part = r.get("over_part")
        part = (f"{_mean_std(over_part, '+')} vs {r['over_label']}, {sum(g > 0 for g in over_part)}"
                f"/{len(p.seeds)}" if over_part else "—")
        body += (f"| {r['label']} | {_mean_std(r['map50_95'])} | {_mean_std(r['map50'])} | {gain} | {wins} | {tt} | "
                 f"{gap} | {part} | {scale} | {r['sec_per_epoch']:.1f} | {over} |\n")
    per_seed = variant_gain_per_seed(rows)
    k = sum(r.get("over_label", "").endswith(" as shipped") for r in rows)
    if per_seed and k > 1:  # over one row the pooled line would only repeat that row's figure
        t_all = paired_t(per_seed)
        body += (f"\nOver its {k} rows, `{p.variant}`'s paired gain over the rows as shipped, averaged over the rows "
                 f"seed by seed: {', '.join(f'{g:+.4f}' for g in per_seed)}; mean {_mean_std(per_seed, '+')}, "
                 f"{sum(g > 0 for g in per_seed)}/{len(per_seed)} seeds above, paired t "
                 f"{'—' if math.isnan(t_all) else f'{t_all:.1f}'}.\n")
    both = [r for r in rows if "gain_baselines" in r]
    if both:
        body += ("\nAgainst both baseline runs of each seed (the mean of its plain and null runs: the plain student "
                 "trained twice, so the baseline carries half the run-to-run variance of one run):\n\n"
                 "| student | gain vs plain and null (paired) | wins | paired t |\n|---|---|---|---|\n")
        for r in both:
            g, tb = r["gain_baselines"], paired_t(r["gain_baselines"])
            body += (f"| {r['label']} | {_mean_std(g, '+')} | {sum(x > 0 for x in g)}/{len(g)} | "
                     f"{'—' if math.isnan(tb) else f'{tb:.1f}'} |\n")
    n = len(p.seeds)
    quantile = T_ONE_SIDED_5.get(n - 1)
    needs = ("it needs at least 2 seeds" if n < 2 else f"one-sided p < 0.05 needs t > {quantile:.2f} with {n} seeds"
             if quantile else "one-sided p < 0.05 needs t > 1.70 or a little less")
    foot = (f"\npaired t: mean paired gain / its standard error over the seeds ({needs}). "
            "cap scale: mean over epochs and seeds of "
            "`kd_scale`, the factor `kd_max_ratio` multiplied the capped terms by (1 = the cap never bound; — = no "
            "capped term). vs its last part: a composition's paired gain over its last part alone (dfd+ld against ld), "
            "with its wins; for a variant's row, its paired gain over the row as shipped (the runs without the "
            "variant's arguments, where they have run for every seed). s/epoch: wall time per training epoch, with "
            "the profile's `jobs` runs sharing the machine. KD step overhead: one distillation step / (student step "
            "+ teacher forward), `yolokd overhead` on the same models (1.00 = the KD terms cost nothing beyond "
            "running both models).\n")
    if any(r["student"] == NULL_ROW for r in rows):
        foot += (f"null: the plain student with the final learning-rate fraction `lrf` {NULL_LRF_STEP:g} higher, "
                 "which cannot matter in expectation; its paired gain is run-to-run noise alone, what a row's gain "
                 "must stand out from.\n")
    return head + body + foot


# one-sided 95 % quantile of Student's t by degrees of freedom: the paired t a gain must exceed
T_ONE_SIDED_5 = {1: 6.31, 2: 2.92, 3: 2.35, 4: 2.13, 5: 2.02, 6: 1.94, 7: 1.89, 8: 1.86, 9: 1.83, 10: 1.81,
                 11: 1.80, 12: 1.78, 13: 1.77, 14: 1.76, 15: 1.75, 16: 1.75, 17: 1.74, 18: 1.73, 19: 1.73, 20: 1.72,
                 21: 1.72, 22: 1.72, 23: 1.71, 24: 1.71, 25: 1.71, 26: 1.71, 27: 1.70, 28: 1.70, 29: 1.70}


def plot(rows: list[dict], seeds: tuple[int, ...], path: Path) -> None:
    """Write `gain_figure` to `path` (PNG)."""
    fig = gain_figure(rows, seeds)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def seed_ranges(seeds: tuple[int, ...]) -> str:
    """`0–4, 7, 9–14` for seeds (0, 1, 2, 3, 4, 7, 9, ..., 14): a title that stays short however many seeds ran."""
    runs = []
    for s in sorted(seeds):
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}, {b}" if b == a + 1 else f"{a}–{b}" for a, b in runs)


def gain_figure(rows: list[dict], seeds: tuple[int, ...]):
    """Paired gain over the plain student per row: one point per seed, the mean as a bar, zero as a line.

    Absolute mAP bars would hide gains of 0.01-0.05 in the spread between seeds; the paired gain removes it. The
    figure is never narrower than its title, however few rows it has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["student"] != "plain"]
    fig, ax = plt.subplots(figsize=(max(0.75 * len(rows) + 2, 5.0), 4))
    for i, r in enumerate(rows):
        mean = statistics.mean(r["gain"])
        ax.bar(i, mean, color="tab:blue" if mean > 0 else "tab:orange", alpha=0.6)
        ax.scatter([i] * len(r["gain"]), r["gain"], color="black", s=12, zorder=3)
    ax.axhline(0.0, color="tab:gray", linewidth=1)
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=40, ha="right")
    ax.set_ylabel("mAP50-95 gain over plain (paired by seed)")
    ax.set_title(f"one point per seed ({seed_ranges(seeds)})\nbar = mean", fontsize=10)
    fig.tight_layout()
    return fig


def plot_epochs(rows: list[dict], path: Path, close_mosaic: int = 0) -> None:
    """Paired gain over the plain student at every epoch, one panel per row: a thin line per seed, their mean thick,
    and the epoch where Ultralytics' close_mosaic phase starts dashed (where a mid-run lead can be lost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["student"] != "plain" and any(r.get("epoch_gain", []))]
    if not rows:
        return
    cols = min(4, len(rows))
    fig, axes = plt.subplots(-(-len(rows) // cols), cols, figsize=(3.2 * cols, 2.4 * -(-len(rows) // cols)),
                             sharex=True, sharey=True, squeeze=False)
    for ax, r in zip(axes.flat, rows):
        curves = [c for c in r["epoch_gain"] if c]
        n = min(map(len, curves))
        for c in curves:
            ax.plot(range(1, len(c) + 1), c, color="tab:gray", linewidth=0.7)
        ax.plot(range(1, n + 1), [statistics.mean(c[e] for c in curves) for e in range(n)], color="tab:blue")
        ax.axhline(0.0, color="black", linewidth=0.6)
        if 0 < close_mosaic < n:
            ax.axvline(n - close_mosaic + 0.5, color="tab:red", linestyle="--", linewidth=0.8)
        ax.set_title(r["label"], fontsize=9)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    fig.supxlabel("epoch (red: close_mosaic starts)")
    fig.supylabel("val mAP50-95 gain over plain")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # one narrow panel would clip the figure-wide y label
    plt.close(fig)


def bench(p: Profile, command: str | None = None, report: bool = False) -> Path:
    """Run (or continue) the benchmark and write `benchmarks.md`, `benchmarks.json`, `benchmarks.png` and
    `benchmarks-epochs.png` in out/ (`command`: the command line, printed above the table; `report`: from the
    finished runs alone, training nothing, see `finished_results`)."""
    results = finished_results(p) if report else run_all(p)
    rows = summarize(p, results, overhead_run(p, results))
    out = Path(p.out)
    md = markdown(p, results, rows, command)
    (out / "benchmarks.md").write_text(md)
    (out / "benchmarks.json").write_text(json.dumps({"profile": asdict(p), "command": command, "results": results,
                                                     "rows": rows}, indent=2))
    plot(rows, p.seeds, out / "benchmarks.png")
    close_mosaic = p.train_args.get("close_mosaic", p.student_args.get("close_mosaic", DEFAULT_CFG.close_mosaic))
    plot_epochs(rows, out / "benchmarks-epochs.png", int(close_mosaic))
    LOGGER.info(f"\n{md}\nWritten to {out.resolve()}/benchmarks.(md|json|png) and benchmarks-epochs.png")
    return out / "benchmarks.md"


GAINS_HELP = """\
yolokd gains [profile=NAME] [field=value ...] [train argument=value ...]     (earlier name: yolokd bench)

Does distillation pay? Trains the teacher, then for each seed the plain student and one distilled student per
method, all with identical arguments, and writes out/benchmarks.md (the command and code version above the table),
benchmarks.json, benchmarks.png (paired gain over the plain student, per seed) and benchmarks-epochs.png (the
same gain at every epoch of training, per seed: when a lead is built and when it is lost). Finished runs are skipped and
interrupted ones resumed: run the same command again to continue.

Profiles (data=synthetic, generated locally; out= per profile):
  scratch   the main one: students from yolov8n.yaml, Ultralytics' own schedule, 30 epochs, 3 seeds, 18 rows, ~5.7 h
  demo      the README's quick job: a warm-started plain and ld student, 4 epochs, one seed (~40 min)
  cpu       warm-started students, 4 epochs, 2 seeds;  cpu8: 8 epochs, 3 seeds
  gpu       yolov8l teacher, yolov8n student, 640 px, 100 epochs (data= a real dataset, device=0)

Fields: methods=a,b+c,null seeds=0,1,2 epochs= teacher_epochs= imgsz= batch= fraction= jobs= out= device=
        teacher_model= student_model= student_init_epochs= variant=NAME (a variant of yolokd arguments whose
        distilled runs are named <method>-NAME_s<seed> and paired with the same plain runs, and with the rows as
        shipped where those ran: the table then ends with the variant's gain over them, averaged over its rows;
        a variant of kd_fade alone trains the rows as shipped too, once up to where the fade begins, then apart)
The row null is the plain student with lrf 0.0001 higher, a nudge that cannot matter in expectation: its paired
gain is run-to-run noise alone, the spread a method's gain must stand out from (in the scratch profile's rows).
With it, a second table gives each row's paired gain over the mean of its seed's plain and null runs.
Any other key is a train argument of every run (Ultralytics' or yolokd's, e.g. kd_max_ratio=0).
report=true writes the table from the runs that have finished and trains nothing; while any run of the command has
not finished, it names those in progress (with the epochs each holds), counts those not started, names the seeds
whose runs have all finished (seeds= with those gives their table), and stops. The command above the table omits it.
"""


PROFILE_COUNTS = {"epochs": ">= 1", "teacher_epochs": ">= 1", "cls_teacher_epochs": ">= 1",
                  "student_init_epochs": ">= 0", "jobs": ">= 1", "imgsz": ">= 32", "batch": ">= 1"}  # int fields


def check_profile_fields(updates: dict, profile: str) -> None:
    """The fields given on the command line, in place: seeds and the counts as ints, each in its range, before
    anything is trained (a wrong one would otherwise fail inside a run, after the teacher has started)."""
    from yolokd.config import check_number, check_whole_numbers

    shipped = PROFILES[profile]
    for key, allowed in PROFILE_COUNTS.items():
        if key in updates:
            updates[key] = check_number(key, updates[key], int, allowed,
                                        f" (profile={profile} has {getattr(shipped, key)})")
    if "seeds" in updates:
        updates["seeds"] = check_whole_numbers("seeds", updates["seeds"], ">= 0", "0,1,2")
    if "fraction" in updates:
        updates["fraction"] = check_number("fraction", updates["fraction"], float, "in (0, 1]",
                                           ": the share of the train images every run trains on")


def cmd_gains(argv: list[str]) -> int:
    """`yolokd gains`: see GAINS_HELP."""
    from yolokd.config import parse_kv
    from yolokd.config import DistillationConfigError, check_train_keys, check_train_values, closest, split_kd_args
    from yolokd.methods.base import parse_methods

    a = parse_kv(argv)
    report = a.pop("report", False)
    if not isinstance(report, bool):
        raise DistillationConfigError(f"report={report} is not true or false: report=true writes the table of the "
                                      "finished runs and trains nothing.")
    name = a.pop("profile", "cpu")
    if name not in PROFILES:
        raise DistillationConfigError(f"profile={name} is not a benchmark profile.{closest(str(name), list(PROFILES))}"
                                      f" Profiles: {', '.join(PROFILES)}.")
    p = PROFILES[name]
    fields = set(Profile.__dataclass_fields__)
    updates = {k: a.pop(k) for k in list(a) if k in fields}
    if "methods" in updates:
        v = updates["methods"]
        updates["methods"] = tuple(v.split(",") if isinstance(v, str) else v if isinstance(v, (list, tuple)) else [v])
    check_profile_fields(updates, name)
    for m in updates.get("methods", ()):
        if m != NULL_ROW:
            parse_methods(m)
    check_train_keys(a)
    check_train_values(a)
    ultra, _ = split_kd_args(a)
    changed = [*ultra, *(k for k in updates if k not in {"methods", "seeds", "jobs", "out", "variant", "device"})]
    if updates.get("variant") and changed:
        raise DistillationConfigError(
            f"variant= shares the plain runs, so it may change yolokd arguments only, not {', '.join(changed)}: "
            "give that change its own out= folder instead.")
    command = " ".join(["yolokd gains", *(x for x in argv if not x.startswith("report="))])
    bench(replace(p, **updates, train_args={**p.train_args, **a}), command=command, report=report)
    return 0
