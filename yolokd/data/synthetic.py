"""`data=synthetic`: a small detection dataset drawn locally, so yolokd runs end to end with no download.

Six shape classes (see `SYNTHETIC_NAMES`); the class is the shape only, never the colour. Images are generated on
first use, cached, and identical for a given seed: each image has its own generator, seeded by
(seed, split, index), so any one image can be reproduced on its own. The output is plain Ultralytics YOLO format
(images/{train,val}/*.png, labels/{train,val}/*.txt with `cls cx cy w h` normalised, data.yaml).

The dataset is meant to separate a larger detector from a smaller one after a short training run (so a teacher has
something to teach), while staying learnable in a few epochs at imgsz 128-160. The difficulty knobs below:

- size: the longer box side is log-uniform in `SIZE_RANGE` of the image side, so many objects are small
  (about 10 px at 160 px) and some take half the frame; every shape is also randomly rotated and stretched.
- colour: object colours are uniform and independent of class, so colour is no shortcut. Each object is kept at
  least `MIN_CONTRAST` (RGB distance) from the pixels it covers, so none vanishes entirely.
- clutter: a gradient background with low-frequency colour noise, random lines, small irregular blobs (smaller than
  the smallest object) and thin ellipse outlines/arcs, a few lines drawn over the objects too. None is labelled, and
  the blobs/outlines look like small circles or rings at a glance.
- occlusion: objects are drawn one after another; a placement is rejected when it would hide more than
  `MAX_HIDDEN` of an earlier object's pixels. Labels are the full tight box of each object, hidden part included.
- image quality: random mild Gaussian blur and pixel noise.
- count: 1..max_objects objects per image (uniform), and `EMPTY_FRACTION` of images have none.

Changing any knob or the drawing code changes the images: bump `GENERATOR_VERSION` so caches are regenerated.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

GENERATOR_VERSION = 1

SYNTHETIC_NAMES: dict[int, str] = {0: "circle", 1: "square", 2: "triangle", 3: "cross", 4: "star", 5: "ring"}

SIZE_RANGE = (0.06, 0.45)  # longer box side, as a fraction of the image side (log-uniform)
MAX_HIDDEN = 0.5  # a later object may hide at most this fraction of an earlier object's pixels
MIN_CONTRAST = 60.0  # wanted RGB distance between an object's colour and the mean of the pixels it covers
EMPTY_FRACTION = 0.03  # images with no object at all
PLACEMENT_TRIES = 12  # positions tried per object before it is dropped

_SPLITS = {"train": 0, "val": 1}
_SUBPIXEL = 4  # cv2 fixed-point bits: vertices are drawn at 1/16 px
_ALLOWED_IN_ROOT = {"images", "labels", "data.yaml", ".complete"}


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate.

    Attributes:
        n_train: Number of training images.
        n_val: Number of validation images.
        imgsz: Side of the square images, in pixels.
        seed: Base seed; the same spec always gives the same dataset.
        max_objects: Most objects in one image.
    """

    n_train: int = 800
    n_val: int = 200
    imgsz: int = 160
    seed: int = 0
    max_objects: int = 8

    def __post_init__(self):
        """Reject specs that cannot make a usable dataset."""
        if self.n_train < 1 or self.n_val < 1:
            raise ValueError(f"SyntheticSpec needs n_train >= 1 and n_val >= 1, got {self.n_train}, {self.n_val}")
        if self.imgsz < 32:
            raise ValueError(f"SyntheticSpec needs imgsz >= 32, got {self.imgsz}")
        if self.max_objects < 1:
            raise ValueError(f"SyntheticSpec needs max_objects >= 1, got {self.max_objects}")


PRESETS: dict[str, SyntheticSpec] = {
    "synthetic": SyntheticSpec(),
    "synthetic-tiny": SyntheticSpec(n_train=48, n_val=16, imgsz=128),
}


def cache_root() -> Path:
    """Folder holding generated presets: `$YOLOKD_CACHE` if set, else ~/.cache/yolokd."""
    env = os.environ.get("YOLOKD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "yolokd"


def is_synthetic(data: str | Path | None) -> bool:
    """Whether `data` names a built-in preset (a str equal to a `PRESETS` key)."""
    return isinstance(data, str) and data in PRESETS


def resolve_data(data: str | Path) -> str:
    """Turn a preset name into the path of its (generated or cached) data.yaml; return anything else unchanged.

    Args:
        data: A preset name such as 'synthetic', or any other Ultralytics `data=` value.

    Returns:
        (str): The yaml path for a preset, else `data` as a str.
    """
    if not is_synthetic(data):
        return str(data)
    spec = PRESETS[data]
    root = cache_root() / f"{data}-seed{spec.seed}-v{GENERATOR_VERSION}"
    return str(make_dataset(root, spec))


def make_dataset(root: str | Path, spec: SyntheticSpec = SyntheticSpec(), progress: bool = True) -> Path:
    """Generate a dataset into `root` (images/, labels/, data.yaml) unless it is already there.

    A complete dataset carries a `.complete` marker recording the spec and `GENERATOR_VERSION`; with a matching
    marker this returns at once. Otherwise the dataset is written into a temporary folder beside `root` and renamed
    into place, so an interrupted run never leaves a half dataset that looks complete.

    Args:
        root: Dataset folder; replaced if it holds an older or partial synthetic dataset.
        spec: What to generate.
        progress: Show a progress bar.

    Returns:
        (Path): The data.yaml path.

    Raises:
        FileExistsError: `root` holds files that are not a synthetic dataset (never deleted).
    """
    root = Path(root).expanduser().resolve()
    yaml_path = root / "data.yaml"
    marker = _marker_text(spec)
    if _is_complete(root, marker):
        return yaml_path
    if root.exists() and not (root.is_dir() and {p.name for p in root.iterdir()} <= _ALLOWED_IN_ROOT):
        raise FileExistsError(f"{root} exists and is not a synthetic dataset folder; pick an empty or new folder.")

    from ultralytics.utils import LOGGER, TQDM

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    try:
        counts = np.zeros(len(SYNTHETIC_NAMES), dtype=np.int64)
        bar = TQDM(total=spec.n_train + spec.n_val, desc=f"Generating {root.name}", disable=not progress)
        for split, n in (("train", spec.n_train), ("val", spec.n_val)):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            for i in range(n):
                img, labels = render_image(spec, split, i)
                ok, png = cv2.imencode(".png", img)  # encode + write_bytes: about twice as fast as cv2.imwrite
                if not ok:
                    raise OSError(f"could not encode image {split}/{i}")
                (tmp / "images" / split / f"{i:06d}.png").write_bytes(png.tobytes())
                (tmp / "labels" / split / f"{i:06d}.txt").write_text(_label_text(labels, spec.imgsz))
                for cls, *_ in labels:
                    counts[cls] += 1
                bar.update(1)
        bar.close()
        _write_yaml(tmp / "data.yaml", root)
        (tmp / ".complete").write_text(marker)  # written last: its presence means everything above is on disk
        _swap_into_place(tmp, root, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    per_class = ", ".join(f"{SYNTHETIC_NAMES[c]} {int(counts[c])}" for c in SYNTHETIC_NAMES)
    LOGGER.info(
        f"synthetic: {spec.n_train} train + {spec.n_val} val images ({spec.imgsz} px, seed {spec.seed}), "
        f"{int(counts.sum())} objects ({per_class}) in {time.perf_counter() - t0:.1f}s -> {root}"
    )
    return yaml_path


def render_image(spec: SyntheticSpec, split: str, index: int) -> tuple[np.ndarray, list[tuple]]:
    """Draw one image of the dataset; the same arguments always give the same result.

    Args:
        spec: Dataset spec (imgsz, seed, max_objects are used).
        split: 'train' or 'val'.
        index: Image number within the split.

    Returns:
        (tuple): The BGR uint8 image (imgsz x imgsz x 3) and its labels as (cls, x0, y0, x1, y1) in pixels.
    """
    rng = np.random.default_rng([spec.seed, _SPLITS[split], index])
    s = spec.imgsz
    img = _background(rng, s)
    _clutter(rng, img)

    n = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, spec.max_objects + 1))
    placed: list[_Placed] = []
    for _ in range(n):
        cls = int(rng.integers(len(SYNTHETIC_NAMES)))
        contours = _shape(rng, cls, s)
        for _ in range(PLACEMENT_TRIES):
            obj = _place(rng, contours, s)
            if _occludes(obj, placed):
                continue
            color = _pick_color(rng, img, obj)
            pts = [np.round(c * (1 << _SUBPIXEL)).astype(np.int32) for c in obj.contours]
            cv2.fillPoly(img, pts, color, lineType=cv2.LINE_AA, shift=_SUBPIXEL)
            _hide(obj, placed)
            obj.cls = cls
            placed.append(obj)
            break

    for _ in range(int(rng.integers(0, 3))):  # a few strokes over the objects
        _line(rng, img, thickness=1)
    return _degrade(rng, img), [(o.cls, *o.box) for o in placed]


# ----------------------------------------------------------------------------------------------------- drawing


class _Placed:
    """An object at its final position: exact float box, and a pixel mask of its still-visible part."""

    def __init__(self, contours: list[np.ndarray]):
        """Rasterise `contours` (pixel coordinates, ring = outer + inner) into a mask cropped to their box."""
        self.contours = contours
        outer = contours[0]
        self.box = (*outer.min(0).tolist(), *outer.max(0).tolist())  # x0, y0, x1, y1 (float, exact)
        self.x0, self.y0 = int(math.floor(self.box[0])), int(math.floor(self.box[1]))
        h, w = int(math.ceil(self.box[3])) - self.y0 + 1, int(math.ceil(self.box[2])) - self.x0 + 1
        mask = np.zeros((h, w), np.uint8)
        shifted = [np.round((c - (self.x0, self.y0)) * (1 << _SUBPIXEL)).astype(np.int32) for c in contours]
        cv2.fillPoly(mask, shifted, 1, lineType=cv2.LINE_8, shift=_SUBPIXEL)
        self.visible = mask.view(bool)  # 0/1 uint8 reinterpreted, no copy
        self.full = self.n_visible = max(cv2.countNonZero(mask), 1)
        self.cls = -1

    def overlap(self, other: _Placed) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
        """Slices of self's and other's masks covering the same pixels, or None when the boxes are disjoint."""
        ya, xa = max(self.y0, other.y0), max(self.x0, other.x0)
        yb = min(self.y0 + self.visible.shape[0], other.y0 + other.visible.shape[0])
        xb = min(self.x0 + self.visible.shape[1], other.x0 + other.visible.shape[1])
        if ya >= yb or xa >= xb:
            return None
        mine = (slice(ya - self.y0, yb - self.y0), slice(xa - self.x0, xb - self.x0))
        theirs = (slice(ya - other.y0, yb - other.y0), slice(xa - other.x0, xb - other.x0))
        return mine, theirs


_BG_GRID = 8  # the background is built on an 8x8 grid and upsampled (smooth by construction, and fast)


@lru_cache(maxsize=8)
def _noise_bank(s: int) -> np.ndarray:
    """Fixed Gaussian pixel noise (2s x 2s x 3); each image adds a random crop of it, scaled (cached per size)."""
    return np.random.default_rng(1234).standard_normal((2 * s, 2 * s, 3), dtype=np.float32)


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    """A linear two-colour gradient plus smooth low-frequency colour blotches."""
    v = (np.arange(_BG_GRID, dtype=np.float32) + 0.5) / _BG_GRID - 0.5
    theta = rng.uniform(0, 2 * np.pi)
    t = v[None, :] * np.cos(theta) + v[:, None] * np.sin(theta) + 0.5
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    k = int(rng.integers(2, 9))  # blotches per side: big soft patches to busy mottling
    blotches = rng.normal(0, rng.uniform(5, 35), (k, k, 3)).astype(np.float32)
    low = c0 + t[..., None] * (c1 - c0) + cv2.resize(blotches, (_BG_GRID, _BG_GRID), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(np.clip(low, 0, 255).astype(np.uint8), (s, s), interpolation=cv2.INTER_CUBIC)


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A uniform random BGR colour as cv2 wants it."""
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _line(rng: np.random.Generator, img: np.ndarray, thickness: int) -> None:
    """A random straight stroke that may run off the image."""
    s = img.shape[0]
    p = np.round(rng.uniform(-0.1, 1.1, 4) * s).astype(int)
    cv2.line(img, (p[0], p[1]), (p[2], p[3]), _random_color(rng), thickness, cv2.LINE_AA)


def _clutter(rng: np.random.Generator, img: np.ndarray) -> None:
    """Unlabelled distractors under the objects: lines, small irregular blobs, thin ellipse outlines and arcs."""
    s = img.shape[0]
    for _ in range(int(rng.integers(2, 9))):
        _line(rng, img, thickness=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 6))):  # blobs: diameter below the smallest object size
        k = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radius = rng.uniform(0.012, 0.025) * s * rng.uniform(0.5, 1.0, k)
        centre = rng.uniform(0.05, 0.95, 2) * s
        pts = centre + np.stack([np.cos(angles), np.sin(angles)], 1) * radius[:, None]
        cv2.fillPoly(img, [np.round(pts * (1 << _SUBPIXEL)).astype(np.int32)], _random_color(rng), cv2.LINE_AA,
                     _SUBPIXEL)
    for _ in range(int(rng.integers(0, 4))):  # thin, clearly elongated outlines, often open arcs
        a = rng.uniform(0.04, 0.2) * s
        axes = (int(round(a)), max(1, int(round(a * rng.uniform(0.25, 0.6)))))
        centre = tuple(int(v) for v in np.round(rng.uniform(0, 1, 2) * s))
        start = rng.uniform(0, 360)
        cv2.ellipse(img, centre, axes, rng.uniform(0, 180), start, start + rng.uniform(120, 360), _random_color(rng),
                    1, cv2.LINE_AA)


def _regular_polygon(n: int, radii: np.ndarray | float = 1.0) -> np.ndarray:
    """(n, 2) vertices around the origin, the first one pointing up the y axis."""
    t = np.pi / 2 + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1) * np.reshape(radii, (-1, 1))


_FIXED_SHAPES = {  # unit outlines of the shapes without a random parameter (a circle is a 48-gon)
    "circle": _regular_polygon(48),
    "ring": _regular_polygon(48),
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float),
    "triangle": _regular_polygon(3),
}


def _shape(rng: np.random.Generator, cls: int, s: int) -> list[np.ndarray]:
    """Contours of one object of class `cls`, randomly stretched, rotated and scaled, with its box at (0, 0).

    Returns:
        (list[np.ndarray]): Float (N, 2) pixel contours: the outline, plus the hole for a ring.
    """
    name = SYNTHETIC_NAMES[cls]
    if name in _FIXED_SHAPES:
        unit = _FIXED_SHAPES[name]
    elif name == "cross":
        a = rng.uniform(0.25, 0.4)  # arm half-width
        unit = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a],
                         [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]], float)
    else:  # star: five points
        unit = _regular_polygon(10, np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5)))

    stretch = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    linear = rot @ np.diag([math.sqrt(stretch), 1 / math.sqrt(stretch)])
    outer = unit @ linear.T
    size = math.exp(rng.uniform(math.log(SIZE_RANGE[0]), math.log(SIZE_RANGE[1]))) * s  # the longer box side, in pixels
    scale = size / (outer.max(0) - outer.min(0)).max()
    outer = outer * scale
    contours = [outer]
    if name == "ring":  # the hole: the same ellipse shrunk, leaving a band at least ~1.5 px wide
        band = max(rng.uniform(0.25, 0.45), min(0.6, 1.5 / (0.5 * size)))
        contours.append(outer * (1 - band))
    low = outer.min(0)
    return [c - low for c in contours]


def _place(rng: np.random.Generator, contours: list[np.ndarray], s: int) -> _Placed:
    """Move box-origin contours to a random position that keeps the box 1 px inside the image."""
    extent = contours[0].max(0)
    offset = rng.uniform(1, np.maximum(s - 1 - extent, 1.0 + 1e-6))
    return _Placed([c + offset for c in contours])


def _occludes(new: _Placed, placed: list[_Placed]) -> bool:
    """Whether drawing `new` would leave an earlier object with less than 1 - MAX_HIDDEN of its pixels visible."""
    for old in placed:
        sl = old.overlap(new)
        if sl is not None:
            hidden = int(np.count_nonzero(old.visible[sl[0]] & new.visible[sl[1]]))
            if old.n_visible - hidden < (1 - MAX_HIDDEN) * old.full:
                return True
    return False


def _hide(new: _Placed, placed: list[_Placed]) -> None:
    """Mark the pixels `new` covers as hidden in every earlier object."""
    for old in placed:
        sl = old.overlap(new)
        if sl is not None:
            covered = old.visible[sl[0]] & new.visible[sl[1]]
            old.visible[sl[0]] &= ~covered
            old.n_visible -= int(np.count_nonzero(covered))


def _pick_color(rng: np.random.Generator, img: np.ndarray, obj: _Placed, tries: int = 8) -> tuple[int, int, int]:
    """A random colour at least MIN_CONTRAST from the mean of the pixels `obj` covers (else the best of `tries`)."""
    h, w = obj.visible.shape
    under = np.array(cv2.mean(img[obj.y0 : obj.y0 + h, obj.x0 : obj.x0 + w], obj.visible.view(np.uint8))[:3])
    colors = rng.integers(0, 256, (tries, 3))
    dist = np.sqrt(((colors - under) ** 2).sum(1))
    ok = np.flatnonzero(dist >= MIN_CONTRAST)
    return tuple(int(v) for v in colors[ok[0] if ok.size else int(dist.argmax())])


def _degrade(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Mild camera-like degradation: optional Gaussian blur, then colour pixel noise."""
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (3, 3), rng.uniform(0.4, 1.0))
    s = img.shape[0]
    ox, oy = (int(v) for v in rng.integers(0, s, 2))
    noise = _noise_bank(s)[oy : oy + s, ox : ox + s]
    return cv2.addWeighted(img, 1.0, noise, rng.uniform(2, 8), 0.0, dtype=cv2.CV_8U)

# ----------------------------------------------------------------------------------------------------- files


def _label_text(labels: list[tuple], s: int) -> str:
    """YOLO label lines `cls cx cy w h` (normalised) for pixel boxes (cls, x0, y0, x1, y1)."""
    lines = []
    for cls, x0, y0, x1, y1 in labels:
        x0, x1 = max(x0, 0.0) / s, min(x1, s) / s
        y0, y1 = max(y0, 0.0) / s, min(y1, s) / s
        lines.append(f"{cls} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}")
    return "".join(line + "\n" for line in lines)


def _write_yaml(path: Path, root: Path) -> None:
    """The Ultralytics data yaml; `path` is the final (absolute) dataset folder, not the temporary one."""
    import yaml

    data = {"path": str(root), "train": "images/train", "val": "images/val", "names": dict(SYNTHETIC_NAMES)}
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _marker_text(spec: SyntheticSpec) -> str:
    """Content of the `.complete` marker: the spec and the generator version."""
    return json.dumps({"generator_version": GENERATOR_VERSION, "spec": asdict(spec)}, sort_keys=True)


def _is_complete(root: Path, marker: str) -> bool:
    """Whether `root` holds a finished dataset made from the same spec and generator version."""
    try:
        return (root / ".complete").read_text() == marker and (root / "data.yaml").is_file()
    except OSError:
        return False


def _swap_into_place(tmp: Path, root: Path, marker: str) -> None:
    """Rename the finished `tmp` to `root`, moving any old dataset aside first and deleting it afterwards."""
    old = None
    if root.exists():
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(root, old)
    try:
        os.replace(tmp, root)
    except OSError:
        if not _is_complete(root, marker):  # another process finishing the same dataset first is fine
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
