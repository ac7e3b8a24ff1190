"""What a detection dataset holds, checked before training: each problem found is one line naming the file and the fix.

Ultralytics reads the labels only once the run folder exists, and then an empty image folder, a class id outside
`names` or a dataset without a single label ends in a traceback, or trains on nothing. `check_dataset` reads every
label file of the train and val splits (a few seconds for COCO's 120k small text files) and refuses:
- a split whose folders hold no image;
- a split where no image has a label file with at least one box (images without labels are fine: background);
- a label line whose class id is not one of `names` (0..nc-1), or that is not `class x y w h` numbers.
"""

from __future__ import annotations

from pathlib import Path

from yolokd.config import DistillationConfigError

SPLITS = ("train", "val")


def load_dataset(data: str | Path) -> dict:
    """Ultralytics' `check_det_dataset` (which downloads a dataset named in Ultralytics' yamls when its images are
    missing), with a failed download (offline, a dead link) turned into one line naming the fix."""
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils import DATASETS_DIR

    try:
        return check_det_dataset(str(data))
    except FileNotFoundError:  # Ultralytics' own one-line message: the yaml, or images it has no download for
        raise
    except OSError as e:  # ConnectionError, requests' errors, a disk that filled up during the download
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].strip("❌ .")
        raise DistillationConfigError(
            f"data={data}: its images are not on this machine and Ultralytics could not download them ({first}). "
            f"Download it where there is internet and put it where the yaml's `path:` points (a relative one is "
            f"under {DATASETS_DIR}), or pass a local dataset (data=path/to/data.yaml, or data=synthetic).") from e


def image_files(spec: str | list[str]) -> list[Path]:
    """Image paths of one split entry of a data yaml: directories (recursive), image files or .txt lists.

    Follows Ultralytics' rules (`BaseDataset.get_img_files`): in a .txt list, './' is relative to the list's folder.
    """
    from ultralytics.data.utils import IMG_FORMATS

    files: list[str] = []
    for p in spec if isinstance(spec, (list, tuple)) else [spec]:
        p = Path(p)
        if p.is_dir():
            files += [str(f) for f in p.rglob("*.*")]
        elif p.suffix == ".txt" and p.is_file():
            lines = p.read_text(encoding="utf-8-sig").strip().splitlines()
            files += [str(p.parent / x[2:]) if x.startswith("./") else x for x in lines]
        elif p.is_file():
            files.append(str(p))
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return [Path(f) for f in sorted(f for f in files if f.rpartition(".")[-1].lower() in IMG_FORMATS)]


def _boxes_in(label: Path, nc: int, source: str) -> int:
    """The number of boxes in one label file; a bad line raises naming the file, the line and the fix."""
    n = 0
    for i, line in enumerate(label.read_text(errors="replace").splitlines(), 1):
        words = line.split()
        if not words:
            continue
        try:
            values = [float(w) for w in words]
        except ValueError:
            values = []
        if len(values) < 5 or not values[0].is_integer():
            raise DistillationConfigError(
                f"{label}, line {i}: '{line.strip()[:60]}' is not a YOLO label row (class x_center y_center width "
                "height, numbers normalised to 0-1): fix or delete the line.")
        if not 0 <= values[0] < nc:
            raise DistillationConfigError(
                f"{label}, line {i}: class id {int(values[0])} is not one of the {nc} classes of {source} (ids 0-"
                f"{nc - 1}): fix the label, or add the class to 'names' in {source}.")
        n += 1
    return n


def check_dataset(data: dict, source: str = "the data yaml") -> None:
    """Refuse the dataset `data` (Ultralytics' `check_det_dataset` dict) if a split holds no image, no label at
    all, or a label row that cannot train (see the module docstring). `source` names the yaml in the messages."""
    from ultralytics.data.utils import img2label_paths

    for split in SPLITS:
        if not data.get(split):
            continue
        try:
            files = image_files(data[split])
        except FileNotFoundError as e:
            raise DistillationConfigError(f"{split}: {e}: fix '{split}:' in {source}.") from e
        if not files:
            raise DistillationConfigError(
                f"{split}: {data[split]} holds no image: put the {split} images there, or fix '{split}:' in {source}.")
        labels = [Path(p) for p in img2label_paths([str(f) for f in files])]
        boxes = sum(_boxes_in(lb, data["nc"], source) for lb in labels if lb.is_file())
        if not boxes:
            raise DistillationConfigError(
                f"{split}: none of the {len(files)} images has a label with a box (looked for {labels[0].parent}/"
                f"{labels[0].name} and the like, one .txt per image, in labels/ beside images/): add the labels, "
                "or fix the folder layout.")
