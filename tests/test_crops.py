"""`yolokd crops`: one classification sample per ground-truth object, as an ImageFolder Ultralytics can train."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolokd.data.crops import cmd_crops, crop_window, folder_name, make_crops, read_labels

NAMES = {0: "zebra", 1: "apple", 2: "traffic/light"}  # unsorted on purpose, and one name with a path separator
W, H = 60, 40
PATCH = (10, 8, 30, 28)  # x1, y1, x2, y2 of class 0's coloured square in train/a.png
BGR = (30, 140, 220)


def _row(c, x1, y1, x2, y2):
    return f"{c} {(x1 + x2) / 2 / W:.6f} {(y1 + y2) / 2 / H:.6f} {(x2 - x1) / W:.6f} {(y2 - y1) / H:.6f}"


@pytest.fixture
def det_data(tmp_path) -> Path:
    """A 3-class dataset: 3 train images (one without labels), 1 val image; one degenerate box."""
    rng = np.random.default_rng(0)
    labels = {
        "train/a": [_row(0, *PATCH), _row(1, 50, 10, 70, 30), _row(1, 5, 5, 5.6, 20)],  # 2nd overshoots, 3rd < 2 px
        "train/b": [_row(2, 0, 0, 12, 12), _row(0, 20, 20, 44, 36)],
        "train/empty": None,
        "val/c": [_row(1, 2, 2, 22, 30)],
    }
    for stem, rows in labels.items():
        im = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        if stem == "train/a":
            im[PATCH[1] : PATCH[3], PATCH[0] : PATCH[2]] = BGR
        (tmp_path / "images" / stem).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "images" / f"{stem}.png"), im)
        if rows is not None:
            (tmp_path / "labels" / stem).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "labels" / f"{stem}.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "data.yaml").write_text(
        f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: {NAMES}\n"
    )
    return tmp_path / "data.yaml"


def _files(out: Path, split: str, name: str) -> list[Path]:
    return sorted((out / split / folder_name(name)).glob("*.png"))


def _expected_counts(root: Path, split: str, min_size: float = 2.0) -> tuple[dict[str, int], int]:
    """Per-class counts read straight from the label files (boxes at least min_size px inside the image)."""
    counts, skipped = dict.fromkeys(map(folder_name, NAMES.values()), 0), 0
    for f in (root / "labels" / split).glob("*.txt"):
        for line in f.read_text().split("\n"):
            if line:
                c, x, y, w, h = map(float, line.split())
                inside_w = min((x + w / 2) * W, W) - max((x - w / 2) * W, 0)
                inside_h = min((y + h / 2) * H, H) - max((y - h / 2) * H, 0)
                if min(inside_w, inside_h) < min_size:
                    skipped += 1
                else:
                    counts[folder_name(NAMES[int(c)])] += 1
    return counts, skipped


def test_counts_per_class_match_label_files(det_data, tmp_path):
    out = tmp_path / "crops"
    s = make_crops(str(det_data), out)
    for split in ("train", "val"):
        counts, skipped = _expected_counts(det_data.parent, split)
        assert s["counts"][split] == counts and s["skipped"][split] == skipped
        assert {folder_name(n): len(_files(out, split, n)) for n in NAMES.values()} == counts
    assert s["skipped"]["train"] == 1 and s["images"] == {"train": 3, "val": 1}
    assert s["counts"]["train"] == {"zebra": 2, "apple": 1, "traffic_light": 1}
    assert (out / "val" / "zebra").is_dir()  # every class has a folder in every split, even an empty one


def test_crop_is_the_box_and_padding_enlarges_it(det_data, tmp_path):
    make_crops(str(det_data), tmp_path / "p0")
    make_crops(str(det_data), tmp_path / "p25", pad=0.25)
    plain = cv2.imread(str(tmp_path / "p0" / "train" / "zebra" / "a_0.png"))
    padded = cv2.imread(str(tmp_path / "p25" / "train" / "zebra" / "a_0.png"))
    assert plain.shape[:2] == (20, 20) and (plain == BGR).all()  # exactly the coloured square
    assert padded.shape[:2] == (30, 30)  # 5 px of context on each side of a 20 px box
    assert (padded[5:25, 5:25] == BGR).all() and not (padded == BGR).all()
    over = cv2.imread(str(tmp_path / "p25" / "train" / "apple" / "a_1.png"))
    assert over.shape[:2] == (30, 15)  # x: 45..75 clamped to 60; y: 5..35


def test_imgsz_resizes_every_crop(det_data, tmp_path):
    make_crops(str(det_data), tmp_path / "sq", imgsz=16)
    shapes = {cv2.imread(str(f)).shape for f in (tmp_path / "sq").rglob("*.png")}
    assert shapes == {(16, 16, 3)}


def test_rerun_replaces_previous_set_and_foreign_folders_are_refused(det_data, tmp_path):
    out = tmp_path / "crops"
    make_crops(str(det_data), out)
    (out / "train.cache").write_text("stale")
    s = make_crops(str(det_data), out, pad=0.1)
    assert sum(1 for _ in (out / "train").rglob("*.png")) == sum(s["counts"]["train"].values())
    assert not (out / "train.cache").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a crop set"):
        make_crops(str(det_data), foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_ultralytics_reads_the_crop_folder(det_data, tmp_path):
    from ultralytics.data.utils import check_cls_dataset

    make_crops(str(det_data), tmp_path / "crops")
    d = check_cls_dataset(str(tmp_path / "crops"))
    assert d["nc"] == 3 and d["val"] is not None
    assert sorted(d["names"].values()) == sorted(map(folder_name, NAMES.values()))


def test_crop_window_hand_values():
    # box 10 px wide at x 20..30 of a 100 x 50 image, y 10..30; pad 0.5 -> 15..35, 0..40
    assert crop_window(np.array([0.25, 0.4, 0.1, 0.4]), 100, 50, 0.0, 2) == (20, 10, 30, 30)
    assert crop_window(np.array([0.25, 0.4, 0.1, 0.4]), 100, 50, 0.5, 2) == (15, 0, 35, 40)
    assert crop_window(np.array([0.25, 0.4, 0.01, 0.4]), 100, 50, 5.0, 2) is None  # 1 px: padding can't rescue it
    assert crop_window(np.array([1.2, 0.5, 0.1, 0.1]), 100, 50, 0.0, 2) is None  # wholly outside


def test_polygon_labels_become_their_box(tmp_path):
    f = tmp_path / "seg.txt"
    f.write_text("2 0.1 0.2 0.5 0.2 0.3 0.6\n1 0.5 0.5 0.2 0.2\n")
    assert np.allclose(read_labels(f), [[2, 0.3, 0.4, 0.4, 0.4], [1, 0.5, 0.5, 0.2, 0.2]])
    assert read_labels(tmp_path / "missing.txt").shape == (0, 5)


def test_cmd_crops(det_data, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cmd_crops([f"data={det_data}", f"out={out}", "pad=0.1", "imgsz=8"]) == 0
    assert "yolo classify train" in capsys.readouterr().out
    assert {cv2.imread(str(f)).shape for f in out.rglob("*.png")} == {(8, 8, 3)}
    with pytest.raises(SyntaxError, match="'padd' is not an argument of `yolokd crops`. Did you mean 'pad'"):
        cmd_crops([f"data={det_data}", "padd=0.1"])
    with pytest.raises(SyntaxError, match="data= is required"):
        cmd_crops([])
    bad = {"imgsz=abc": "imgsz=abc must be a whole number >= 1.", "imgsz=8.5": "imgsz=8.5 must be a whole number",
           "min_size=x": "min_size=x must be a whole number >= 1.", "pad=-1": "pad=-1 must be a number >= 0.",
           "fraction=2": "fraction=2 must be a number in (0, 1].", "imgsz=0": "imgsz=0 must be a whole number >= 1."}
    for arg, message in bad.items():  # refused before the out folder is made
        with pytest.raises(ValueError, match=re.escape(message)):
            cmd_crops([f"data={det_data}", f"out={tmp_path / 'bad'}", arg])
        assert not (tmp_path / "bad").exists()


def test_fraction_keeps_the_train_images_ultralytics_trains_on(det_data, tmp_path):
    # 3 train images sorted a, b, empty: fraction 0.34 -> round(1.02) = 1 image (a), as Ultralytics' fraction= does;
    # val is never cut.
    s = make_crops(str(det_data), tmp_path / "crops", fraction=0.34)
    assert s["images"] == {"train": 1, "val": 1}
    assert sum(s["counts"]["train"].values()) == 2 and s["counts"]["train"][folder_name("traffic/light")] == 0
    assert sum(s["counts"]["val"].values()) == 1
