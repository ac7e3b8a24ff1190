"""Bad input fails before training starts, names the problem and the fix, and leaves run folders untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from helpers import save_checkpoint
from yolokd.cli import main
from yolokd.config import DistillationConfigError
from yolokd.data.synthetic import SYNTHETIC_NAMES
from yolokd.trainer import DistillationTrainer


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Teacher-like checkpoints, each wrong in one way (random weights: no training needed)."""
    d = tmp_path_factory.mktemp("ckpts")
    renamed = {i: f"other{i}" for i in range(len(SYNTHETIC_NAMES))}
    (d / "corrupt.pt").write_bytes(b"this is not a checkpoint")
    return {
        "good": save_checkpoint(d / "good.pt", "yolov8n.yaml", SYNTHETIC_NAMES),
        "nc3": save_checkpoint(d / "nc3.pt", "yolov8n.yaml", {0: "a", 1: "b", 2: "c"}),
        "renamed": save_checkpoint(d / "renamed.pt", "yolov8n.yaml", renamed),
        "p2": save_checkpoint(d / "p2.pt", "yolov8n-p2.yaml", SYNTHETIC_NAMES),
        "cls": save_checkpoint(d / "cls.pt", "yolov8n-cls.yaml", SYNTHETIC_NAMES),
        "corrupt": d / "corrupt.pt",
        "missing": d / "missing.pt",
    }


@pytest.fixture
def existing_run(tmp_path):
    """A previous run folder whose files must survive every refused run."""
    run = tmp_path / "runs" / "exp"
    (run / "weights").mkdir(parents=True)
    (run / "results.csv").write_text("epoch,metrics\n1,0.5\n")
    (run / "weights" / "last.pt").write_bytes(b"previous weights")
    return run


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


CASES = [  # (extra arguments, words the error must contain)
    (dict(teacher="good", method="dfx"), ["Unknown distillation method 'dfx'", "dfd"]),
    (dict(teacher="good", method="dfd+"), ["empty part"]),
    (dict(method="dfd"), ["needs a teacher", "teacher="]),
    (dict(teacher="missing"), ["not found locally", "yolo detect train model=missing.yaml", "random weights"]),
    (dict(teacher="corrupt"), ["corrupt", "teacher"]),
    (dict(teacher="cls"), ["'classify' model", "detection model", "cls_teacher"]),
    (dict(teacher="yolov8n-seg.yaml"), ["'segment' model"]),
    (dict(teacher="nc3"), ["3 classes", "dataset has 6", "Train the teacher"]),
    (dict(teacher="renamed"), ["name their classes differently", "other0", "circle"]),
    (dict(teacher="p2"), ["strides", "[4.0, 8.0, 16.0, 32.0]"]),
    (dict(teacher="good", distill_model="good"), ["distill_model", "method=ultralytics"]),
    (dict(teacher="good", method="ultralytics+dfd"), ["cannot be combined"]),
    (dict(model="yolov8n-cls.yaml", teacher="good"), ["student", "'classify' model"]),
    (dict(method="dicod"), ["needs an image-classifier teacher", "cls_teacher="]),
    (dict(method="dicod", cls_teacher="good"), ["not an image classifier", "teacher="]),
    (dict(method="dicod", cls_teacher="missing"), ["was not found"]),
    (dict(teacher="good", method="fitnet", adapter_init="zeros"), ["adapter_init='zeros'", "lstsq, random"]),
    (dict(teacher="good", method="rmpfi", rm_scores="softmax"), ["rm_scores='softmax'", "logit, prob"]),
    (dict(teacher="good", method="pfi", pfi_detach="maybe"), ["pfi_detach='maybe'", "true or false"]),
    (dict(teacher="good", method="pdf", pdf_projector="mlp"), ["pdf_projector='mlp'", "conv, branch"]),
    (dict(teacher="good", method="dfd+ld", ld_assign="gt"), ["ld_assign='gt'", "student, teacher"]),
    (dict(teacher="good", method="dfd", dfd_alpha="big"), ["dfd_alpha='big'", "a number"]),
]


RANGE_CASES = [  # (numeric arguments, the one-line error): the ranges declared next to the defaults in cfg/
    (dict(method="dfd", dfd_alpha=-1), "dfd_alpha=-1 is out of range: it must be >= 0 (default: 2.8e-05)."),
    (dict(method="dfd", kd_max_ratio=-3), "kd_max_ratio=-3 is out of range: it must be >= 0 (default: 0.25)."),
    (dict(method="dfd", kd_fade=5), "kd_fade=5 is out of range: it must be in [0, 1] (default: empty)."),
    (dict(method="rmpfi", kd_fade="late"), "kd_fade='late' must be a number (default: empty)."),  # empty by default
    (dict(method="rmpfi", rmpfi_fade=-0.5), "rmpfi_fade=-0.5 is out of range: it must be in [0, 1] (default: 0.5)."),
    (dict(method="dfd", kd_grad_ratio=-0.5), "kd_grad_ratio=-0.5 is out of range: it must be >= 0 (default: empty)."),
    (dict(method="ld", ld_temperature=0), "ld_temperature=0 is out of range: it must be > 0 (default: 10.0)."),
    (dict(method="pgd", pgd_topk=0), "pgd_topk=0 is out of range: it must be >= 1 (default: 30)."),
    (dict(method="pgd", pgd_xi_cls=1.5), "pgd_xi_cls=1.5 is out of range: it must be in [0, 1] (default: 0.8)."),
    (dict(method="dfd", lr0="abc"),  # Ultralytics' check of its own keys, run before anything is built
     "'lr0=abc' is of invalid type str. Valid 'lr0' types are int (i.e. 'lr0=0') or float (i.e. 'lr0=0.5')"),
    (dict(method="dfd", plots="maybe"), "'plots=maybe' is of invalid type str. 'plots' must be a bool"),
]


@pytest.mark.parametrize("extra,message", RANGE_CASES, ids=[str(c[0]) for c in RANGE_CASES])
def test_out_of_range_values_are_refused_before_training(extra, message, ckpts, tiny_data, existing_run, capsys):
    before = snapshot(existing_run.parent)
    args = dict(model="yolov8n.yaml", data=tiny_data, project=str(existing_run.parent), name="exp", exist_ok=True,
                epochs=1, imgsz=64, teacher=str(ckpts["good"]), **extra)
    with pytest.raises(DistillationConfigError) as e:
        DistillationTrainer(overrides=args)
    assert message in str(e.value)
    assert main(["train", *(f"{k}={v}" for k, v in args.items())]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert snapshot(existing_run.parent) == before


@pytest.mark.parametrize("extra,words", CASES, ids=[str(c[0]) for c in CASES])
def test_refused_before_training(extra, words, ckpts, tiny_data, existing_run):
    before = snapshot(existing_run.parent)
    args = dict(model="yolov8n.yaml", data=tiny_data, project=str(existing_run.parent), name="exp", exist_ok=True,
                epochs=1, imgsz=64)
    args.update({k: str(ckpts.get(v, v)) for k, v in extra.items()})
    with pytest.raises(DistillationConfigError) as e:
        DistillationTrainer(overrides=args)
    for w in words:
        assert w in str(e.value), f"{w!r} not in: {e.value}"
    assert snapshot(existing_run.parent) == before  # nothing written, nothing deleted


def test_a_yaml_teacher_is_warned_about(ckpts, tiny_data, tmp_path, monkeypatch):
    """A .yaml teacher is allowed (smoke tests use one) but has random weights: the user is told, and a trained
    checkpoint teacher is not warned about."""
    from ultralytics.utils import LOGGER

    said = []
    monkeypatch.setattr(LOGGER, "warning", lambda msg, *a, **k: said.append(msg))
    args = dict(model="yolov8n.yaml", data=tiny_data, project=str(tmp_path), epochs=1, imgsz=64, method="dfd")
    DistillationTrainer(overrides={**args, "teacher": "yolov8s.yaml", "name": "yaml"})
    assert [m for m in said if "teacher=yolov8s.yaml has random weights" in m and "best.pt" in m]
    said.clear()
    DistillationTrainer(overrides={**args, "teacher": str(ckpts["good"]), "name": "pt"})
    assert not [m for m in said if "random weights" in m]


def test_a_dataset_that_cannot_be_downloaded_is_one_line(tmp_path, capsys):
    """A data yaml whose images are missing and whose `download:` fails (offline, as here: nothing listens on the
    port) ends in one line naming the fix, not in Ultralytics' ConnectionError traceback; no run folder is made."""
    data = tmp_path / "data.yaml"
    data.write_text(f"path: {tmp_path / 'missing'}\ntrain: images/train\nval: images/val\nnames: {{0: a}}\n"
                    "download: http://127.0.0.1:9/data.zip\n")
    assert main(["train", "model=yolov8n.yaml", f"data={data}", f"project={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not download them" in err[0] and "data=synthetic" in err[0]
    assert "Traceback" not in err[0] and not (tmp_path / "runs").exists()


def test_misspelt_key_suggests_the_right_one(tiny_data):
    with pytest.raises(SyntaxError, match="teacher"):
        DistillationTrainer(overrides=dict(model="yolov8n.yaml", data=tiny_data, teachr="x.pt"))
    with pytest.raises(SyntaxError, match="dfd_alpha"):
        DistillationTrainer(overrides=dict(model="yolov8n.yaml", data=tiny_data, dfd_alhpa=1.0))


def test_official_name_offline_is_one_line(monkeypatch):
    """An official name Ultralytics cannot fetch: its download warnings are muted, only yolokd's line is left."""
    import logging

    import ultralytics.utils.downloads as downloads
    from ultralytics.utils import LOGGER

    from yolokd.checks import resolve_weights

    def offline(path, *a, **k):
        LOGGER.warning("GitHub assets check failure (offline)")
        raise ConnectionError("offline")

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    seen, keep = [], Keep()
    monkeypatch.setattr(downloads, "attempt_download_asset", offline)
    LOGGER.addHandler(keep)
    try:
        with pytest.raises(DistillationConfigError, match="teacher=yolov8x: teacher weights not found"):
            resolve_weights("yolov8x", "teacher")
        LOGGER.warning("after")  # the logger's level is restored
    finally:
        LOGGER.removeHandler(keep)
    assert len(seen) == 1 and seen[0].endswith("after")


def test_a_missing_teacher_is_the_only_line(tiny_data, tmp_path, capsys):
    """The teacher is checked before the student is built, so none of Ultralytics' model-building lines come first."""
    import logging

    from ultralytics.utils import LOGGER

    class Keep(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage())

    logged, keep, level = [], Keep(), LOGGER.level
    LOGGER.addHandler(keep)
    LOGGER.setLevel("INFO")  # as a user sees it
    try:
        code = main(["train", "model=yolov8n.yaml", f"data={tiny_data}", f"teacher={tmp_path / 'gone.pt'}",
                     f"project={tmp_path}"])
    finally:
        LOGGER.removeHandler(keep)
        LOGGER.setLevel(level)
    assert code == 2 and logged == []
    assert "teacher=" in capsys.readouterr().err and not list(tmp_path.glob("*/"))  # one line, no run folder


def test_a_yaml_model_is_built_without_a_task_warning():
    """load_detector guesses a .yaml's task from its content, not its name (Ultralytics warns for a bare name)."""
    import logging

    from ultralytics.utils import LOGGER

    from yolokd.checks import load_detector

    class Keep(logging.Handler):
        def emit(self, record):
            warned.append(record.getMessage())

    warned, keep = [], Keep(level=logging.WARNING)
    LOGGER.addHandler(keep)
    try:
        model = load_detector("yolov8n.yaml", "student", nc=3)
    finally:
        LOGGER.removeHandler(keep)
    assert model.yaml["nc"] == 3 and warned == []


def test_resuming_a_finished_checkpoint_is_one_line(ckpts, tmp_path, capsys, monkeypatch):
    """A last.pt without optimizer state (a finished run's): Ultralytics would warn and start a new run on its default
    dataset (a download, offline a traceback); yolokd stops with the fix."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "resume=True", f"model={ckpts['good']}"]) == 2
    err = capsys.readouterr().err
    assert "cannot be resumed: it holds no optimizer state" in err and "start a new run" in err
    assert not (tmp_path / "runs").exists()


def test_cli_reports_error_and_exit_code(ckpts, tiny_data, capsys, existing_run):
    before = snapshot(existing_run.parent)
    code = main(["train", "model=yolov8n.yaml", f"teacher={ckpts['nc3']}", f"data={tiny_data}",
                 f"project={existing_run.parent}", "name=exp", "exist_ok=True"])
    assert code == 2
    err = capsys.readouterr().err
    assert "yolokd train: error:" in err and "3 classes" in err
    assert main(["train", "model=missing_student.pt", f"data={tiny_data}"]) == 2
    err = capsys.readouterr().err  # names the argument the user gave (model=), not a key that does not exist
    assert "model=missing_student.pt: student weights not found" in err and "student=" not in err
    assert snapshot(existing_run.parent) == before


def _dataset(root: Path, labels: dict[str, list[str] | None], val_images: int = 1) -> Path:
    """A 2-class dataset: train images a, b, c with the given label lines (None: no label file), val images v*."""
    import cv2
    import numpy as np

    img = np.full((64, 64, 3), 127, np.uint8)
    for split, stems in (("train", list(labels)), ("val", [f"v{i}" for i in range(val_images)])):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            cv2.imwrite(str(root / "images" / split / f"{stem}.png"), img)
            rows = labels.get(stem, ["0 0.5 0.5 0.2 0.2"]) if split == "train" else ["1 0.5 0.5 0.3 0.3"]
            if rows is not None:
                (root / "labels" / split / f"{stem}.txt").write_text("\n".join(rows) + "\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: {{0: a, 1: b}}\n")
    return root / "data.yaml"


DATASET_CASES = [  # (train labels per image, val images, what the one line must say)
    ({"a": None, "b": None, "c": []}, 1, "train: none of the 3 images has a label with a box"),
    ({"a": ["0 0.5 0.5 0.2 0.2"], "b": ["1 0.5 0.5 0.1 0.1", "7 0.2 0.2 0.1 0.1"], "c": None}, 1,
     "b.txt, line 2: class id 7 is not one of the 2 classes of"),
    ({"a": ["0 0.5 0.5 0.2"]}, 1, "a.txt, line 1: '0 0.5 0.5 0.2' is not a YOLO label row"),
    ({"a": ["0 0.5 0.5 0.2 0.2"]}, 0, "holds no image: put the val images there, or fix 'val:' in"),
]


@pytest.mark.parametrize("labels,val_images,message", DATASET_CASES, ids=["no-labels", "class-id", "row", "empty-val"])
def test_dataset_content_is_checked_before_the_run_folder_exists(labels, val_images, message, tmp_path, capsys):
    data = _dataset(tmp_path / "data", labels, val_images)
    project = tmp_path / "runs"
    argv = ["train", "model=yolov8n.yaml", f"data={data}", f"project={project}", "name=exp", "epochs=1", "imgsz=64"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not project.exists()  # refused before Ultralytics made the run folder


def test_images_without_labels_are_background_not_an_error(tmp_path):
    from yolokd.data.checks import check_dataset

    data = _dataset(tmp_path / "data", {"a": ["0 0.5 0.5 0.2 0.2"], "b": None, "c": []})
    from ultralytics.data.utils import check_det_dataset

    check_dataset(check_det_dataset(str(data)))  # one labelled image in train is enough
