"""Object crops of a detection dataset as an image-classification dataset (DICOD's D_det -> D_cls).

DICOD (Guo, Alvarez, Salzmann, NeurIPS'21) trains its classifier teacher on one sample per ground-truth object,
cut out of the detection images. `make_crops` writes that set as an ImageFolder that Ultralytics' classify task
trains as-is:

    out/train/<class name>/<image stem>_<k>.png     one file per object of the detection train split
    out/val/<class name>/<image stem>_<k>.png       the same for the val split
    out/crops.yaml                                 the summary (and the marker that lets a re-run replace the set)

Every class gets a folder in both splits, even an empty one, so the classifier always has the detector's `nc`.
Ultralytics names a classifier's classes after the sorted folder names; `yolokd.methods.dicod` maps them back to
the detector's class order by name, so the sorted order never matters.

Choices:
- `pad` grows each side of the box by `pad` times the box's width (height), then clamps to the image;
- a box narrower or shorter than `min_size` px after clamping to the image is skipped and counted;
- `imgsz` resizes every crop to imgsz x imgsz, stretching it, which is what DICOD's spatial transformer does to
  a box at distillation time (`yolokd.methods.dicod_ops.crop_boxes`); `None` keeps the native crop size.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from yolokd.config import check_number
from yolokd.data.checks import SPLITS, image_files, load_dataset

MARKER = "crops.yaml"


def folder_name(name: str) -> str:
    """The folder (and classifier class) name of a detection class: path separators would nest folders."""
    out = str(name).strip().replace("/", "_").replace("\\", "_")
    return out if out not in {"", ".", ".."} else f"_{out}_"


def read_labels(path: Path) -> np.ndarray:
    """(n, 5) rows `cls, x, y, w, h` (normalized) of a YOLO label file; polygon rows become their bounding box."""
    if not path.is_file():
        return np.zeros((0, 5), np.float32)
    rows = []
    for line in path.read_text().strip().splitlines():
        v = [float(x) for x in line.split()]
        if len(v) > 5:  # segment: cls x1 y1 x2 y2 ... -> enclosing box (Ultralytics' segments2boxes)
            xy = np.array(v[1:1 + 2 * ((len(v) - 1) // 2)]).reshape(-1, 2)
            (x1, y1), (x2, y2) = xy.min(0), xy.max(0)
            v = [v[0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
        if len(v) == 5:
            rows.append(v)
    return np.array(rows, np.float32).reshape(-1, 5)


def crop_window(xywhn: np.ndarray, w: int, h: int, pad: float, min_size: int) -> tuple[int, int, int, int] | None:
    """Integer pixel window (x1, y1, x2, y2) of one normalized box with context padding, or None if degenerate.

    The unpadded box, clamped to the image, must be at least `min_size` px wide and high; padding cannot rescue it.
    """
    cx, cy, bw, bh = xywhn[0] * w, xywhn[1] * h, xywhn[2] * w, xywhn[3] * h
    x1, y1, x2, y2 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
    if min(x2, w) - max(x1, 0) < min_size or min(y2, h) - max(y1, 0) < min_size:
        return None
    x1, x2 = x1 - pad * bw, x2 + pad * bw
    y1, y2 = y1 - pad * bh, y2 + pad * bh
    x1, y1 = max(0, math.floor(x1 + 1e-3)), max(0, math.floor(y1 + 1e-3))  # tolerate round-off of 6-digit labels
    x2, y2 = min(w, math.ceil(x2 - 1e-3)), min(h, math.ceil(y2 - 1e-3))
    return x1, y1, x2, y2


def _prepare_out(out: Path, names: list[str]) -> None:
    """Create the split/class folders; replace a previous crop set, refuse to touch any other non-empty folder."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(
                f"{out} exists and is not a crop set written by `yolokd crops` (no {MARKER}); pick an empty or new out="
            )
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
            (out / f"{split}.cache").unlink(missing_ok=True)  # Ultralytics' classify label cache of the old set
    for split in SPLITS:
        for n in names:
            (out / split / n).mkdir(parents=True, exist_ok=True)


def make_crops(data: str, out: str | Path, pad: float = 0.0, imgsz: int | None = None, min_size: int = 2,
               fraction: float = 1.0) -> dict:
    """Write one classification sample per ground-truth object of a YOLO detection dataset (train and val splits).

    Args:
        data (str): detection data yaml, or a built-in preset name such as "synthetic-tiny".
        out (str | Path): output folder; gets `train/<class>/*.png`, `val/<class>/*.png` and `crops.yaml`.
        pad (float): context added on each side, as a fraction of the box width (height); clamped to the image.
        imgsz (int, optional): resize every crop to imgsz x imgsz (stretched, as DICOD's crop op); None: native size.
        min_size (int): boxes narrower or shorter than this (px, clamped to the image) are skipped and counted.
        fraction (float): use only the first share of the train images, the ones Ultralytics' `fraction=` trains on.

    Returns:
        (dict): `{"out", "names", "counts": {split: {class: n}}, "skipped": {split: n}, "images": {split: n}}`.
    """
    from ultralytics.data.utils import img2label_paths
    from ultralytics.utils import LOGGER, TQDM, YAML, colorstr
    from ultralytics.utils.patches import imread, imwrite

    pad, min_size = check_number("pad", pad, float, ">= 0"), check_number("min_size", min_size, int, ">= 1")
    imgsz = None if imgsz is None else check_number("imgsz", imgsz, int, ">= 1")
    fraction = check_number("fraction", fraction, float, "in (0, 1]")
    try:
        from yolokd.data.synthetic import resolve_data

        data = resolve_data(data)
    except ImportError:  # pragma: no cover  (presets unavailable: a plain data yaml still works)
        pass
    d = load_dataset(data)
    names = [folder_name(d["names"][i]) for i in range(d["nc"])]
    if len(set(names)) != len(names):
        dup = sorted(n for n, c in Counter(names).items() if c > 1)
        raise ValueError(f"class names {dup} occur twice in {data} (after replacing path separators): rename them")
    out = Path(out)
    _prepare_out(out, names)

    summary = {"out": str(out.resolve()), "data": str(data), "pad": pad, "imgsz": imgsz, "names": names,
               "counts": {}, "skipped": {}, "images": {}}
    for split in SPLITS:
        if not d.get(split):
            continue
        files = image_files(d[split])
        if split == "train" and fraction < 1:
            files = files[: max(1, round(len(files) * fraction))]  # as ultralytics.data.base.BaseDataset selects
        counts, skipped, seen = Counter(), 0, Counter()
        for img_path, lb_path in zip(TQDM(files, desc=f"crops {split}"), img2label_paths([str(f) for f in files])):
            labels = read_labels(Path(lb_path))
            if not len(labels):
                continue
            im = imread(str(img_path))
            if im is None:
                skipped += len(labels)
                continue
            h, w = im.shape[:2]
            stem = img_path.stem if not seen[img_path.stem] else f"{img_path.stem}-{seen[img_path.stem]}"
            seen[img_path.stem] += 1
            for k, row in enumerate(labels):
                c = int(row[0])
                win = crop_window(row[1:], w, h, pad, min_size) if 0 <= c < len(names) else None
                if win is None:
                    skipped += 1
                    continue
                x1, y1, x2, y2 = win
                crop = im[y1:y2, x1:x2]
                if imgsz:
                    crop = _resize(crop, imgsz)
                imwrite(str(out / split / names[c] / f"{stem}_{k}.png"), crop)
                counts[names[c]] += 1
        summary["counts"][split] = {n: counts[n] for n in names}
        summary["skipped"][split] = skipped
        summary["images"][split] = len(files)
    YAML.save(out / MARKER, summary)
    LOGGER.info(_format_summary(summary, colorstr("crops:")))
    for n in names:
        if not summary["counts"].get("train", {}).get(n):
            LOGGER.warning(f"crops: class '{n}' has no train crop; the classifier teacher will never see it")
    return summary


def _resize(crop: np.ndarray, size: int) -> np.ndarray:
    import cv2

    shrink = crop.shape[0] > size and crop.shape[1] > size
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _format_summary(s: dict, prefix: str = "crops:") -> str:
    splits = list(s["counts"])
    width = max(len(n) for n in s["names"] + ["class", "skipped"])
    lines = [f"{prefix} {s['out']} (pad={s['pad']}, imgsz={s['imgsz']})",
             f"  {'class':<{width}}" + "".join(f"{sp:>8}" for sp in splits)]
    lines += [f"  {n:<{width}}" + "".join(f"{s['counts'][sp][n]:>8}" for sp in splits) for n in s["names"]]
    lines.append(f"  {'skipped':<{width}}" + "".join(f"{s['skipped'][sp]:>8}" for sp in splits))
    return "\n".join(lines)


CROPS_HELP = """\
yolokd crops data=<data.yaml | synthetic> [out=crops/<data>] [pad=0.0] [imgsz=] [min_size=2] [fraction=1.0]

One classification image per ground-truth object of a detection dataset (train and val splits), as a folder
Ultralytics' classify task trains as-is: out/train/<class>/*.png, out/val/<class>/*.png. DICOD's classifier
teacher (method=dicod cls_teacher=) is trained on it:
  yolokd crops data=synthetic out=datasets/synthetic-crops imgsz=64
  yolo classify train model=yolov8n-cls.yaml data=datasets/synthetic-crops imgsz=64 epochs=10

  pad       context around each box, as a share of its width/height (clamped to the image)
  imgsz     resize every crop to imgsz x imgsz (stretched, as DICOD's crop does at training time); none: native size
  min_size  boxes narrower or shorter than this (px) are skipped and counted
  fraction  the first share of the train images only, those Ultralytics' fraction= trains on
"""


def cmd_crops(argv: list[str]) -> int:
    """`yolokd crops data=<yaml|preset> out=<dir> [pad=0.0] [imgsz=] [min_size=2]`: write the object-crop set."""
    from yolokd.config import closest, parse_kv

    args = parse_kv(argv)
    allowed = ["data", "out", "pad", "imgsz", "min_size", "fraction"]
    for key in args:
        if key not in allowed:
            raise SyntaxError(f"'{key}' is not an argument of `yolokd crops`.{closest(key, allowed)} "
                              f"Valid: {', '.join(allowed)}.")
    if not args.get("data"):
        raise SyntaxError("data= is required, e.g. yolokd crops data=coco8.yaml out=datasets/coco8-crops")
    data = str(args["data"])
    out = args.get("out") or Path("crops") / Path(data).stem
    make_crops(data, out, pad=args.get("pad", 0.0), imgsz=args.get("imgsz"), min_size=args.get("min_size", 2),
               fraction=args.get("fraction", 1.0))
    print(f"Train a classifier teacher on it:  yolo classify train model=yolov8n-cls.yaml data={out} "
          f"imgsz={args.get('imgsz') or 64} epochs=10")
    return 0


__all__ = ["cmd_crops", "crop_window", "folder_name", "make_crops"]
