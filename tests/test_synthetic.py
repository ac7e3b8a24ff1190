"""Tests for the built-in synthetic dataset (yolokd.data.synthetic): small specs, a few seconds in all on CPU."""

import os
import tempfile
from pathlib import Path

# Before ultralytics is first imported: no network, no pip, and a settings dir holding a stand-in font.
_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="yolokd-test-cfg-"))
(_CONFIG_DIR / "Arial.ttf").write_bytes(b"not a real font")
os.environ.setdefault("YOLO_CONFIG_DIR", str(_CONFIG_DIR))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from yolokd.data import synthetic  # noqa: E402
from yolokd.data.synthetic import (  # noqa: E402
    GENERATOR_VERSION,
    PRESETS,
    SYNTHETIC_NAMES,
    SyntheticSpec,
    cache_root,
    is_synthetic,
    make_dataset,
    resolve_data,
)

SMALL = SyntheticSpec(n_train=12, n_val=4, imgsz=64, seed=3)


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


def _labels(root: Path, split: str = "train") -> list[np.ndarray]:
    """One (n, 5) array per label file of `split`, in file order."""
    files = _files(root, f"labels/{split}/*.txt")
    return [np.array([line.split() for line in f.read_text().splitlines()], float).reshape(-1, 5) for f in files]


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    """Nothing a test does may land in the user's real cache."""
    monkeypatch.setenv("YOLOKD_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A 200-image training split shared by the read-only tests."""
    root = tmp_path_factory.mktemp("synthetic") / "ds"
    make_dataset(root, SyntheticSpec(n_train=200, n_val=10, imgsz=96, seed=0), progress=False)
    return root


def test_deterministic_per_seed(tmp_path):
    a = make_dataset(tmp_path / "a", SMALL, progress=False).parent
    b = make_dataset(tmp_path / "b", SMALL, progress=False).parent
    c = make_dataset(tmp_path / "c", SyntheticSpec(n_train=12, n_val=4, imgsz=64, seed=4), progress=False).parent
    for split in ("train", "val"):
        la, lb, lc = (_files(r, f"labels/{split}/*.txt") for r in (a, b, c))
        assert [p.name for p in la] == [p.name for p in lb] == [p.name for p in lc]
        assert len(la) == (SMALL.n_train if split == "train" else SMALL.n_val)
        assert [p.read_bytes() for p in la] == [p.read_bytes() for p in lb]
        assert [p.read_bytes() for p in la] != [p.read_bytes() for p in lc]
        ia, ib, ic = (_files(r, f"images/{split}/*.png") for r in (a, b, c))
        for pa, pb, pc in zip(ia, ib, ic):
            img_a = cv2.imread(str(pa))
            assert img_a.shape == (64, 64, 3)
            assert np.array_equal(img_a, cv2.imread(str(pb)))
            assert not np.array_equal(img_a, cv2.imread(str(pc)))


def test_render_image_reproducible_on_its_own():
    """An image depends only on (seed, split, index), not on what was drawn before it."""
    img1, labels1 = synthetic.render_image(SMALL, "val", 2)
    synthetic.render_image(SMALL, "train", 5)
    img2, labels2 = synthetic.render_image(SMALL, "val", 2)
    assert np.array_equal(img1, img2) and labels1 == labels2
    assert not np.array_equal(img1, synthetic.render_image(SMALL, "train", 2)[0])


def test_label_format(dataset):
    labels = _labels(dataset) + _labels(dataset, "val")
    for f in _files(dataset, "labels/*/*.txt"):
        for line in f.read_text().splitlines():
            assert len(line.split()) == 5, f"{f}: {line!r}"
    boxes = np.concatenate(labels)
    cls, xywh = boxes[:, 0], boxes[:, 1:]
    assert np.all(cls == cls.round()) and cls.min() >= 0 and cls.max() < len(SYNTHETIC_NAMES)
    assert np.all(xywh[:, 2:] > 0) and np.all(xywh[:, 2:] <= 1)
    eps = 1e-5
    assert np.all(xywh[:, :2] - xywh[:, 2:] / 2 >= -eps) and np.all(xywh[:, :2] + xywh[:, 2:] / 2 <= 1 + eps)
    counts = [len(x) for x in labels]
    assert max(counts) <= 8 and np.mean(counts) > 2


def test_yaml_loads_with_ultralytics(dataset, monkeypatch):
    import ultralytics.data.utils as data_utils

    monkeypatch.setattr(data_utils, "check_font", lambda *a, **k: None)  # no font download, whatever the env
    data = data_utils.check_det_dataset(dataset / "data.yaml")
    assert data["nc"] == 6
    assert data["names"] == SYNTHETIC_NAMES
    assert Path(data["train"]) == dataset / "images" / "train"
    assert Path(data["val"]) == dataset / "images" / "val"


def test_class_balance(dataset):
    cls = np.concatenate(_labels(dataset))[:, 0].astype(int)
    counts = np.bincount(cls, minlength=len(SYNTHETIC_NAMES))
    assert counts.min() > 0, counts
    assert counts.max() <= 3 * counts.min(), counts


def test_sizes_vary(dataset):
    boxes = np.concatenate(_labels(dataset))
    longer = boxes[:, 3:5].max(1)
    assert longer.max() / longer.min() >= 4
    assert longer.min() >= 0.04 and longer.max() <= 0.5  # about SIZE_RANGE, rotation and rounding aside


def test_objects_are_visible(dataset):
    """Pixels in labelled boxes differ clearly from the image mean: the objects were really drawn."""
    diffs = []
    for img_file, lab in zip(_files(dataset, "images/train/*.png")[:50], _labels(dataset)[:50]):
        img = cv2.imread(str(img_file)).astype(np.float32)
        s = img.shape[0]
        for _, cx, cy, w, h in lab:
            x0, x1 = int(round((cx - w / 2) * s)), int(round((cx + w / 2) * s))
            y0, y1 = int(round((cy - h / 2) * s)), int(round((cy + h / 2) * s))
            diffs.append(np.abs(img[y0:y1, x0:x1] - img.mean((0, 1))).mean())
    assert len(diffs) > 50
    assert np.mean(diffs) > 15 and np.median(diffs) > 8


def test_some_images_empty_most_not():
    spec = SyntheticSpec(n_train=300, n_val=1, imgsz=48)
    n_empty = sum(not synthetic.render_image(spec, "train", i)[1] for i in range(spec.n_train))
    assert 0 < n_empty < 0.1 * spec.n_train


def test_second_call_reuses(tmp_path):
    yaml_path = make_dataset(tmp_path / "ds", SMALL, progress=False)
    files = [p for p in (tmp_path / "ds").rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    assert make_dataset(tmp_path / "ds", SMALL, progress=False) == yaml_path
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp or old folders left beside it


def test_stale_or_partial_dataset_is_regenerated(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, SMALL, progress=False)
    (root / ".complete").write_text('{"generator_version": 0, "spec": {}}')  # an older generator's dataset
    (root / "images" / "train" / "000000.png").write_bytes(b"stale")
    make_dataset(root, SMALL, progress=False)
    assert cv2.imread(str(root / "images" / "train" / "000000.png")) is not None

    other = SyntheticSpec(n_train=5, n_val=2, imgsz=64, seed=3)  # a different spec: regenerated to match it
    make_dataset(root, other, progress=False)
    assert len(_files(root, "images/train/*.png")) == 5 and len(_files(root, "labels/val/*.txt")) == 2
    assert str(other.n_train) in (root / ".complete").read_text()

    (root / ".complete").unlink()  # interrupted/partial: no marker
    make_dataset(root, SMALL, progress=False)
    assert len(_files(root, "images/train/*.png")) == SMALL.n_train
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_dataset(tmp_path, SMALL, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("YOLOKD_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("YOLOKD_CACHE")
    assert cache_root() == Path.home() / ".cache" / "yolokd"


def test_resolve_data(monkeypatch, tmp_path):
    monkeypatch.setenv("YOLOKD_CACHE", str(tmp_path))
    monkeypatch.setitem(PRESETS, "synthetic-test", SyntheticSpec(n_train=4, n_val=2, imgsz=64, seed=7))
    path = resolve_data("synthetic-test")
    assert isinstance(path, str)
    assert Path(path) == tmp_path / f"synthetic-test-seed7-v{GENERATOR_VERSION}" / "data.yaml"
    assert Path(path).is_file() and resolve_data("synthetic-test") == path
    assert resolve_data("coco8.yaml") == "coco8.yaml"
    assert resolve_data(Path("some/data.yaml")) == str(Path("some/data.yaml"))
    assert not (tmp_path / "coco8.yaml").exists()


def test_is_synthetic_and_presets():
    assert is_synthetic("synthetic") and is_synthetic("synthetic-tiny")
    assert not is_synthetic("Synthetic") and not is_synthetic(Path("synthetic")) and not is_synthetic(None)
    assert not is_synthetic("synthetic.yaml")
    assert PRESETS["synthetic"] == SyntheticSpec()
    assert PRESETS["synthetic-tiny"] == SyntheticSpec(n_train=48, n_val=16, imgsz=128)
    assert SYNTHETIC_NAMES == {0: "circle", 1: "square", 2: "triangle", 3: "cross", 4: "star", 5: "ring"}


def test_spec_validation():
    with pytest.raises(ValueError):
        SyntheticSpec(n_train=0)
    with pytest.raises(ValueError):
        SyntheticSpec(max_objects=0)
