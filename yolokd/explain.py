"""`yolokd explain`: see what the teacher teaches, as the papers' figures, for your own models and images.

For each image: the image with its ground truth and both models' detections (after Ultralytics' NMS or end-to-end
post-processing), then, per method, the maps its loss uses, per pyramid level P3-P5, over the image:
- pgd: the cls mask M^cls and the box mask I^reg, the Gaussian key predictive regions, with dots on their top-K
  anchors (PGD, ECCV 2022, Fig. 1d and 4);
- dfd: the disparity |A(F_T) - A(F_S')| (Eq. 3) and its high/low split (Eq. 4) (DFD, ICML 2024, Fig. 1 and 2);
- pdf, pfi: the per-position weights (PDF-Distil Eq. 2, Fig. 1E; PFI Eq. 9, Fig. 3, third row);
- rm (and rmpfi): each object's candidate anchors numbered by the teacher's and by the student's rank, and both rank
  distributions as bars (Rank Mimicking, AAAI 2022, Fig. 2 and 4);
- dicod: the ground-truth crops the classifier sees, with its top scores;
- ld: the teacher's confidence w_a = max_c p_t; fitnet: the hint error per position.

Nothing is recomputed here. The figure is drawn from one real distillation step: `build_distillation` + `install`
+ a training-mode step of the student on a batch made of the images and their labels (when an image has no label
file, the teacher's detections stand in for them), inside `MethodSet.recording`, so each map is the tensor the
method's `forward` handed to its loss (`DistillMethod.record`). The student's `kd_state.pt`, when it is beside the
checkpoint and of the same method, gives the trained adapters. The same step gives the gradient share
(`gradient_share`): how hard the KD terms pull on the student's weights against the task loss (`kd_grad`), and in
which direction (`kd_grad_cos`), printed and written on the figure with the step's terms.

During training with `plots=True`, `DistillationTrainer` draws the same figure for the first val image at the end of
the first, middle and last epoch (`EpochFigures`, `kd_explain_epoch<e>.png`) and, beside Ultralytics' `results.png`,
`kd_results.png` (`plot_kd_results`): each KD term, the KD share of the loss, `kd_scale` and `kd_agree` per epoch.
"""

from __future__ import annotations

import copy
import csv
import glob
import io
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn

from yolokd.config import DistillationConfigError, closest, parse_kv

EXPLAIN_HELP = """\
yolokd explain model=STUDENT teacher=TEACHER method=METHOD [source=IMAGES | data=DATA n=4] [key=value ...]

Draws what the distillation does on each image, into one PNG per image: the image with its ground truth and both
models' detections, then, for each method, the maps its loss uses, per pyramid level (P3, P4, P5), as recorded in
one real distillation step on these images (pgd: key predictive regions and top-K anchors; dfd: disparity and its
high/low split; pdf, pfi: per-position weights; rm: each object's candidates ranked by teacher and student; dicod:
the crops and the classifier's scores; ld: the teacher's confidence; fitnet: the hint error). It prints the step's
loss terms and the gradient share: kd_grad = |grad of the KD terms| / |grad of the task loss| on the student's
weights, kd_grad_cos = the cosine between the two (near 0: the KD pulls elsewhere than the task does).

  model=        the student: a checkpoint (.pt), or a model .yaml (random init); a kd_state.pt of the same method
                beside the checkpoint gives the trained adapters
  teacher=      the teacher detector (.pt or .yaml); needed by every method but dicod
  method=       a method or several joined by + (default: ld with a teacher); cls_teacher= for dicod
  source=       an image, a folder of images or a glob ('imgs/*.jpg'); default: the first n= images of data='s val
  data=         the dataset (yaml, or synthetic): its labels and class names; default: the student's training data
  n=4           how many val images when source= is not given
  imgsz=        letterbox size; default: the student's training size (else the teacher's), else 640
  conf=0.25     confidence of the drawn detections (and of the teacher's, standing in for missing labels)
  out=          output folder, for <image>_<method>.png; default runs/explain/<name> (name=explain, numbered when
                it exists)
  device=       cpu, 0, ... (default: Ultralytics' choice)
  dpi=100       figure resolution; a panel is 2 inches wide
and every yolokd train argument (the methods' hyper-parameters, kd_max_ratio, ...: `yolokd train help`).

Example:
  yolokd explain model=runs/detect/dfd/weights/best.pt teacher=runs/detect/teacher/weights/best.pt method=dfd \\
                 data=synthetic n=2
"""

OWN_KEYS = {"model": None, "teacher": None, "method": None, "cls_teacher": None, "data": None, "source": None,
            "n": 4, "imgsz": None, "conf": 0.25, "out": None, "name": "explain", "device": None, "dpi": 100}
LEVELS = ("P3", "P4", "P5")
PANEL_IN = 2.0  # inches per panel; three panels a row
MIN_SIDE = 320  # images are drawn at least this many pixels wide, so marks and labels stay legible
GT_COLOR = (0, 200, 0)  # BGR


# ---------------------------------------------------------------------------------------------- images and labels
def find_images(source: str | Path) -> list[Path]:
    """The images of `source`: a file, a folder (its images, sorted) or a glob; one-line errors otherwise."""
    from ultralytics.data.utils import IMG_FORMATS

    def images(paths) -> list[Path]:
        return sorted(Path(p) for p in paths if Path(p).is_file() and Path(p).suffix[1:].lower() in IMG_FORMATS)

    text, path = str(source), Path(str(source))
    formats = ".jpg, .png, .bmp, ... any of Ultralytics' image formats"
    if any(c in text for c in "*?["):
        found = images(glob.glob(text, recursive=True))
        if not found:
            raise DistillationConfigError(f"source={text} matches no image ({formats}): check the pattern.")
        return found
    if path.is_dir():
        found = images(path.rglob("*"))
        if not found:
            raise DistillationConfigError(f"source={text} is a folder with no images ({formats}): point source= at "
                                          "images, or leave it out to use the first images of data='s val split.")
        return found
    if not path.exists():
        raise DistillationConfigError(f"source={text}: no such image or folder. Pass an image, a folder of images or a "
                                      "glob (source='images/*.jpg').")
    if not images([path]):
        raise DistillationConfigError(f"source={text} is not an image ({formats}).")
    return [path]


def val_images(data: dict, n: int) -> list[Path]:
    """The first `n` images of the dataset's val split (a folder, an image list file, or several of them)."""
    from ultralytics.data.utils import IMG_FORMATS

    found = []
    for p in data["val"] if isinstance(data["val"], list) else [data["val"]]:
        p = Path(p)
        if p.is_dir():
            found += find_images(p)
        elif p.suffix == ".txt":
            found += [Path(x) for x in p.read_text().split() if Path(x).suffix[1:].lower() in IMG_FORMATS]
    if not found:
        raise DistillationConfigError(f"the val split of data ({data['val']}) holds no images: pass source=.")
    return found[:n]


def read_labels(image: Path, nc: int) -> np.ndarray | None:
    """The image's YOLO labels (n, 5) [cls, x, y, w, h] normalised (Ultralytics' `verify_image_label`: segments become
    boxes), or None when it has no label file or an unreadable one."""
    from ultralytics.data.utils import img2label_paths, verify_image_label

    im_file, labels, *_, found, _, corrupt, _ = verify_image_label(
        (str(image), img2label_paths([str(image)])[0], "", False, nc, 0, 0, False))
    return labels if im_file is not None and found and not corrupt else None


@dataclass
class Picture:
    """One letterboxed image, as the models see it: `image` (S, S, 3) BGR uint8; `boxes` (n, 5) [cls, x1, y1, x2, y2]
    pixels; `gt`: where the boxes come from ("labels", "teacher" for its detections, or "none")."""

    file: Path
    image: np.ndarray
    boxes: np.ndarray
    gt: str


def letterbox(files: list[Path], imgsz: int, nc: int) -> list[Picture]:
    """Each image resized and padded to `imgsz` (Ultralytics' `LetterBox`), its labels moved with it."""
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.ops import xywhn2xyxy

    box = LetterBox(imgsz, auto=False, scaleup=True)
    out = []
    for f in files:
        im = cv2.imread(str(f))
        if im is None:
            raise DistillationConfigError(f"{f} cannot be read as an image.")
        p = box.get_params({"img": im})
        labels = read_labels(f, nc)
        boxes = np.zeros((0, 5), np.float32)
        if labels is not None and len(labels):
            (w, h), xyxy = p["new_unpad"], labels[:, 1:]
            boxes = np.concatenate([labels[:, :1], xywhn2xyxy(xyxy, w, h, p["left"], p["top"])], 1)
        out.append(Picture(f, box.apply_image({"img": im}, p)["img"], boxes, "none" if labels is None else "labels"))
    return out


def make_batch(pictures: list[Picture], device) -> dict:
    """An Ultralytics training batch (img RGB in [0, 1], batch_idx, cls, bboxes normalised xywh) of the pictures."""
    from ultralytics.utils.ops import xyxy2xywhn

    img = np.stack([p.image[..., ::-1] for p in pictures]).transpose(0, 3, 1, 2)
    side = img.shape[-1]
    boxes = [p.boxes for p in pictures]
    rows = np.concatenate(boxes) if boxes else np.zeros((0, 5), np.float32)
    return {"img": torch.from_numpy(np.ascontiguousarray(img)).to(device).float() / 255,
            "batch_idx": torch.cat([torch.full((len(b),), float(i)) for i, b in enumerate(boxes)]).to(device),
            "cls": torch.from_numpy(rows[:, :1].astype(np.float32)).to(device),
            "bboxes": torch.from_numpy(xyxy2xywhn(rows[:, 1:].astype(np.float32), side, side)).to(device)}


# ---------------------------------------------------------------------------------------------- the recorded step
@torch.no_grad()
def detect(model, img: torch.Tensor, conf: float) -> list[np.ndarray]:
    """The model's detections (n, 6) [x1, y1, x2, y2, conf, cls] per image: eval forward, then Ultralytics' NMS (or its
    end-to-end filter for a YOLO26 one-to-one head), as `predict` does."""
    from ultralytics.utils import nms

    was = model.training
    model.eval()
    try:
        preds = model(img)
    finally:
        model.train(was)
    out = nms.non_max_suppression(preds, conf, 0.7, max_det=300, end2end=getattr(model, "end2end", False))
    return [d.cpu().numpy() for d in out]


@dataclass
class Explained:
    """What one recorded step saw: the pictures, both models' detections, the methods' records
    (`MethodSet.recording`: {branch: {method: {key: [tensor, ...]}}}), the loss items, strides and class names."""

    pictures: list[Picture]
    detections: dict[str, list[np.ndarray]]
    records: dict
    items: dict[str, float]
    strides: list[int]
    names: dict[int, str]
    methods: list[str]

    @property
    def method(self) -> str:
        """The `method=` value, e.g. "pgd+rm"."""
        return "+".join(self.methods)


def gradient_share(losses: torch.Tensor, params: list[torch.Tensor]) -> dict[str, float]:
    """How the distillation pulls on the student's weights in one step, from `DistillationLoss`'s loss vector (task
    terms, then the KD sum as applied, cap included): `kd_grad` = |grad KD| / |grad task| and `kd_grad_cos` = the
    cosine between the two gradients (about 0: KD pulls elsewhere than the task; 1: it pushes the task's way).
    The KD gradient is the whole loss's minus the task's: what the step applies, after the gradient-share cap
    (`kd_grad_ratio`, which needs the task gradient in the same backward pass) as well as the loss cap."""
    def flat_grad(part: torch.Tensor) -> torch.Tensor:
        grads = (torch.autograd.grad(part, params, retain_graph=True, allow_unused=True) if part.requires_grad
                 else [None] * len(params))
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])

    task = flat_grad(losses[:-1].sum())
    kd = flat_grad(losses.sum()) - task
    if kd.norm() == 0:  # nothing of the KD terms reaches these weights: no direction to compare
        return {"kd_grad": 0.0, "kd_grad_cos": float("nan")}
    return {"kd_grad": float(kd.norm() / task.norm().clamp_min(1e-12)),
            "kd_grad_cos": float(torch.nn.functional.cosine_similarity(task, kd, dim=0))}


def explain(crit, student, teacher, pictures: list[Picture], conf: float = 0.25, names=None) -> Explained:
    """Detections of both models, then one training-mode step of `student` under the distillation `crit`
    (`build_distillation`'s, not yet installed: it is installed for the step and removed after) with recording on,
    and the gradient share of that step (`gradient_share`, nothing is updated).

    Pictures without labels get the teacher's detections as ground truth. The step runs in fp32; it changes
    `student`'s BatchNorm statistics, so pass a copy of a model that must not change.
    """
    device = next(student.parameters()).device
    img = make_batch(pictures, device)["img"]
    detections = {"student": detect(student, img, conf)}
    if teacher is not None:
        detections["teacher"] = detect(teacher, img, conf)
        for p, d in zip(pictures, detections["teacher"]):
            if p.gt == "none":
                p.boxes, p.gt = np.concatenate([d[:, 5:6], d[:, :4]], 1).astype(np.float32), "teacher"
    batch = make_batch(pictures, device)
    crit.install(student)
    was = student.training
    student.train()
    try:
        with torch.autocast(device.type, enabled=False), crit.methods.recording() as records:
            losses, items = student.loss(batch)
            items.update(gradient_share(losses, [q for q in student.parameters() if q.requires_grad]))
        if crit.grad_cap is not None:  # the loss reports the previous step's factor: give this step's instead
            items["kd_gscale"] = torch.stack([crit.grad_cap.factor(p) for p in crit.grad_cap.pulls.values()]).mean()
    finally:
        crit.remove()
        student.train(was)
    names = names or student.names
    records = {b: {m: {k: [v.detach() for v in vs] for k, vs in rec.items()} for m, rec in per_method.items()}
               for b, per_method in records.items()}  # the graph was for the gradient share only
    return Explained(pictures, detections, records, {k: float(v) for k, v in items.items()},
                     [int(s) for s in student.stride], dict(enumerate(names)) if isinstance(names, list) else names,
                     list(crit.methods.methods))


# ---------------------------------------------------------------------------------------------- drawing
def level_maps(values: list[torch.Tensor], shapes: list[tuple[int, int]], i: int) -> list[np.ndarray]:
    """Image `i`'s map per pyramid level from a method's record: one tensor per level, (B, H, W), (B, 1, H, W),
    (B, H*W) or (B, C, H, W) (shown as its channel mean), or one (B, A) tensor over all levels, P3 first."""
    if len(values) == 1 and len(shapes) > 1:
        values = values[0].split([h * w for h, w in shapes], dim=-1)
    maps = []
    for v, (h, w) in zip(values, shapes):
        v = v[i].float()
        maps.append((v.mean(0) if v.dim() == 3 and v.shape[0] > 1 else v).reshape(h, w).cpu().numpy())
    return maps


def overlay(image: np.ndarray, grid: np.ndarray, vmax: float) -> np.ndarray:
    """`grid` (h, w) as a JET heat map on [0, vmax] over `image` (BGR, shown in grey so that only the map has
    colour), one flat cell per grid position."""
    m = np.clip(grid / vmax, 0, 1) if vmax > 0 else np.zeros_like(grid)
    cells = cv2.resize((255 * m).astype(np.uint8), image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    return cv2.addWeighted(grey, 0.45, cv2.applyColorMap(cells, cv2.COLORMAP_JET), 0.55, 0)


def anchor_centres(index: np.ndarray, shapes: list[tuple[int, int]], side: int) -> np.ndarray:
    """(n, 2) x, y pixel centres, in an image drawn `side` pixels wide, of flat anchor indices over P3..P5."""
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    level = np.searchsorted(starts, index, side="right") - 1
    h, w = np.array(shapes)[level].T
    local = index - starts[level]
    return np.stack([(local % w + 0.5) * side / w, (local // w + 0.5) * side / h], 1)


class Canvas:
    """The pictures drawn at a legible size, with boxes (Ultralytics' `Annotator`)."""

    def __init__(self, ex: Explained, i: int):
        self.ex, self.i = ex, i
        image = ex.pictures[i].image
        self.scale = max(1.0, MIN_SIDE / image.shape[0])
        self.image = cv2.resize(image, None, fx=self.scale, fy=self.scale, interpolation=cv2.INTER_LINEAR)
        self.shapes = [(image.shape[0] // s, image.shape[1] // s) for s in ex.strides]

    def boxes(self, image: np.ndarray, who: str | None) -> np.ndarray:
        """`image` with the ground truth (green) and the detections of `who` (class colours, with confidences)."""
        from ultralytics.utils.plotting import Annotator, colors

        ann = Annotator(image.copy(), line_width=max(1, round(self.image.shape[0] / 160)))
        for c, *xyxy in self.ex.pictures[self.i].boxes:
            ann.box_label(np.array(xyxy) * self.scale, "", GT_COLOR)
        dets = self.ex.detections.get(who) if who else None
        for *xyxy, conf, c in dets[self.i] if dets is not None else []:
            ann.box_label(np.array(xyxy) * self.scale, f"{self.ex.names.get(int(c), int(c))} {conf:.2f}",
                          colors(int(c), True))
        return ann.result()


@dataclass(frozen=True)
class MapRow:
    """A row of three panels, P3-P5: the recorded tensors under `key` over the image, with the ground truth. Colour
    scale [0, vmax]: `vmax` when given (a probability, a mask), else the row's maximum, or each panel's own for maps
    the method normalises per level (`per_level`); from 0 up, so a uniform map shows as uniform. `dots` marks the
    non-zero positions (PGD's top-K anchors)."""

    key: str
    title: str
    vmax: float | None = None
    per_level: bool = False
    dots: bool = False

    def draw(self, axes, canvas: Canvas, rec: dict) -> None:
        maps = level_maps(rec[self.key], canvas.shapes, canvas.i)
        row_max = max(float(m.max()) for m in maps)
        for ax, m, level in zip(axes, maps, LEVELS):
            vmax = self.vmax or (float(m.max()) if self.per_level else row_max)
            image = canvas.boxes(overlay(canvas.image, m, vmax), None)
            if self.dots:
                for x, y in anchor_centres(np.flatnonzero(m), [m.shape], image.shape[0]):
                    cv2.circle(image, (int(x), int(y)), 2, (255, 255, 255), -1)
            show(ax, image, f"{level} {m.shape[0]}x{m.shape[1]}  max {m.max():.3g}")
        axes[0].set_ylabel(self.title, fontsize=7)


def show(ax, image: np.ndarray, title: str) -> None:
    """`image` (BGR) in the panel `ax`, titled, without ticks."""
    ax.imshow(image[..., ::-1])
    ax.set_title(title, fontsize=6, pad=2)
    ax.set_xticks([])
    ax.set_yticks([])


def rank_row(axes, canvas: Canvas, rec: dict) -> None:
    """Rank Mimicking (Fig. 2, 4): each object's candidate anchors numbered by the teacher's rank (left) and by the
    student's (middle) of its class score; bars: both rank distributions t', s' (Eq. 5), per object, KL (Eq. 6)."""
    from ultralytics.utils.plotting import colors

    axes[0].set_ylabel("rm: ranks of each object's candidates", fontsize=7)
    b, anc, _, group = (x.cpu().numpy() for x in rec["candidates"])
    rank_t, rank_s = (x.exp().cpu().numpy() for x in rec["rank"])
    kl_cls = rec["kl"][0].cpu().numpy()
    mine = b == canvas.i
    objects = sorted(set(group[mine]), key=lambda g: -np.sum(group == g))[:4]
    panels, bars, x0 = [canvas.boxes(canvas.image, None) for _ in range(2)], [], 0
    for g in objects:
        members = np.flatnonzero(group == g)
        by_t = members[np.argsort(-rank_t[members], kind="stable")][:5]  # its top candidates, teacher's order
        student_rank = {m: r + 1 for r, m in enumerate(members[np.argsort(-rank_s[members], kind="stable")])}
        colour = colors(int(g), True)
        for panel, number in zip(panels, (lambda r, m: r + 1, lambda r, m: student_rank[m])):
            for r, (m, (x, y)) in enumerate(zip(by_t, anchor_centres(anc[by_t], canvas.shapes, panel.shape[0]))):
                for ink, width in ((0, 0, 0), 4), (colour, 2):  # the object's colour, outlined in black
                    cv2.putText(panel, str(number(r, m)), (int(x) - 6, int(y) + 6), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                                ink, width, cv2.LINE_AA)
        xs = np.arange(len(by_t)) + x0
        bars.append((xs, rank_t[by_t], rank_s[by_t], np.array(colour[::-1]) / 255, kl_cls[g]))
        x0 += len(by_t) + 1
    show(axes[0], panels[0], "teacher's rank (1 = first)")
    show(axes[1], panels[1], "student's rank, same anchors")
    for xs, t, s, colour, kl in bars:
        axes[2].bar(xs - 0.2, t, 0.4, color=colour, edgecolor="black", linewidth=0.3)
        axes[2].bar(xs + 0.2, s, 0.4, facecolor=(*colour, 0.3), edgecolor=colour, linewidth=0.6)
        axes[2].text(xs.mean(), max(t.max(), s.max()), f"KL {kl:.2g}", fontsize=6, ha="center", va="bottom")
    axes[2].set_title("t' (dark) vs s' (light), by teacher rank", fontsize=6, pad=2)
    axes[2].tick_params(labelsize=4)
    axes[2].set_xticks([])


def crop_row(axes, canvas: Canvas, rec: dict) -> None:
    """DICOD: the ground-truth crops the classifier sees (slides, Eq. 1), with its top two classes and scores."""
    mine = torch.cat(rec["image"]) == canvas.i
    crops, probs = torch.cat(rec["crops"])[mine][:9], torch.cat(rec["logits"])[mine][:9].softmax(1)
    for ax in axes:
        ax.axis("off")
    axes[0].text(-0.05, 0.5, "dicod: crops, classifier's top scores", fontsize=7, rotation=90, ha="right",
                 va="center", transform=axes[0].transAxes)
    for j, (crop, p) in enumerate(zip(crops, probs)):
        ax = axes[j // 3].inset_axes([(j % 3) / 3, 0.2, 0.3, 0.7])
        ax.imshow(crop.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        top = p.topk(min(2, len(p)))
        ax.set_title("\n".join(f"{canvas.ex.names.get(int(c), int(c))} {v:.2f}" for v, c in zip(*top)), fontsize=5,
                     pad=1)
        ax.axis("off")


ROWS = {
    "fitnet": [MapRow("hint_error", "fitnet: hint error (X_T - r(X_S))^2")],
    "dfd": [MapRow("disparity", "dfd: disparity |A(F_T) - A(F_S')|"),
            MapRow("hd_mask", "dfd: high (red) / low (blue) disparity", vmax=1.0)],
    "pdf": [MapRow("weight", "pdf: weight W (Eq. 2), mean 1 per level")],
    "pfi": [MapRow("weight", "pfi: weight of F_dif (Eq. 9)")],
    "rm": [rank_row],
    "rmpfi": [rank_row, MapRow("weight", "rmpfi: PFI weight (Eq. 9)")],
    "pgd": [MapRow("cls_mask", "pgd: cls mask M, top-K dots", per_level=True, dots=True),
            MapRow("reg_mask", "pgd: box mask I_reg, top-K dots", vmax=1.0, dots=True)],
    "dicod": [crop_row],
    "ld": [MapRow("confidence", "ld: teacher confidence max_c p_t", vmax=1.0)],
}


def draw(ex: Explained, i: int, path: Path, dpi: int = 100, title: str = "") -> Path:
    """The figure of picture `i`: detections, then each method's rows (`ROWS`) of what it recorded (one-to-many
    branch), saved as `path`; `title` follows the method's name."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and none opened
    import matplotlib.pyplot as plt

    canvas = Canvas(ex, i)
    records = ex.records.get("one2many", {})
    rows = [(m, row) for m in ex.methods for row in ROWS[m]]
    fig, axes = plt.subplots(1 + len(rows), 3, figsize=(3 * PANEL_IN, (1 + len(rows)) * PANEL_IN * 1.08), dpi=dpi,
                             squeeze=False)
    show(axes[0, 0], canvas.boxes(canvas.image, "teacher"), "teacher" if "teacher" in ex.detections else "no teacher")
    show(axes[0, 1], canvas.boxes(canvas.image, "student"), "student")
    axes[0, 0].set_ylabel(f"ground truth: {ex.pictures[i].gt}", fontsize=7)
    terms = list(ex.items)[list(ex.items).index("kd_loss"):]
    axes[0, 2].axis("off")
    axes[0, 2].text(0, 1, f"{ex.pictures[i].file.name}\nmethod={ex.method}{title}\n\nthe step's terms:\n"
                    + "\n".join(f"{k} {ex.items[k]:.4g}" for k in terms), fontsize=6, va="top", family="monospace")
    for (method, row), ax_row in zip(rows, axes[1:]):
        rec = records.get(method, {})
        if rec:
            row.draw(ax_row, canvas, rec) if isinstance(row, MapRow) else row(ax_row, canvas, rec)
        else:
            for ax in ax_row:
                ax.axis("off")
            ax_row[0].text(0, 0.5, f"{method}: nothing recorded (no object with a positive anchor)", fontsize=6)
    fig.tight_layout(pad=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    png = Image.open(buffer).convert("RGB").quantize(256, dither=Image.Dither.NONE)  # 256 colours: ~5x smaller
    png.save(path, optimize=True)
    return path


# ---------------------------------------------------------------------------------------------- during training
def figure_epochs(epochs: int) -> set[int]:
    """The 1-based epochs whose end `EpochFigures` draws: the first, the middle and the last."""
    return {1, (epochs + 1) // 2, epochs}


class EpochFigures:
    """`on_fit_epoch_end` callback of `DistillationTrainer` with `plots=True`, rank 0 only: `kd_explain_epoch<e>.png`
    in the run folder, the figure of the first val image at the end of the first, middle and last epoch (and of the
    epoch where training stops early)."""

    def __init__(self):
        self.stopped = False

    def __call__(self, trainer) -> None:
        from ultralytics.utils import RANK

        if RANK not in {-1, 0} or self.stopped:
            return
        self.stopped = bool(trainer.stop)  # Ultralytics' final validation calls this once more: not an epoch
        epoch = trainer.epoch + 1
        if epoch in figure_epochs(trainer.epochs) or trainer.stop:
            epoch_figure(trainer, epoch)


def epoch_figure(trainer, epoch: int) -> Path:
    """The figure of the run's first val image, drawn from a step of a copy of the student with the run's teacher,
    methods and trained adapters; the run itself (weights, statistics, random state) is left as it was."""
    from ultralytics.utils.torch_utils import unwrap_model

    from yolokd.criterion import build_distillation
    from yolokd.taps import strip_taps

    pictures = letterbox(val_images(trainer.data, 1), trainer.args.imgsz, trainer.data["nc"])
    cuda = [trainer.device.index or 0] if trainer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        student = copy.deepcopy(unwrap_model(trainer.model))
        strip_taps(student)
        crit = build_distillation(trainer.kd_method_names, student, trainer.teacher, trainer.args, trainer=trainer,
                                  device=trainer.device)
        crit.methods.load_state_dict(trainer.kd_methods.state_dict())
        ex = explain(crit, student, trainer.teacher, pictures, names=trainer.data["names"])
    return draw(ex, 0, trainer.save_dir / f"kd_explain_epoch{epoch}.png", title=f"\nend of epoch {epoch}")


def plot_kd_results(results_csv: Path, on_plot=None) -> Path | None:
    """`kd_results.png` beside `results.png`: per epoch, each KD term (the `train/<term>` columns), the KD share of the
    training loss, kd_loss / (task terms + kd_loss), and `kd_scale` (the cap's factor) and `kd_agree` when logged.
    None when results.csv has no `train/kd_loss`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results_csv) as f:
        rows = [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if not rows or "train/kd_loss" not in rows[0]:
        return None
    cols = [k for k in rows[0] if k.startswith("train/")]
    kd = cols.index("train/kd_loss")
    series = lambda k: np.array([r[k] for r in rows])  # noqa: E731
    extra = {"train/kd_scale": "kd_scale (the cap's factor)", "train/kd_agree": "kd_agree |p_t - p_s|, p_t > 0.5"}
    terms = {c[6:]: series(c) for c in cols[kd:] if c not in {*extra, "train/kd_skip"}}
    ratios = {"KD share of the loss": series("train/kd_loss") / np.maximum(sum(series(c) for c in cols[: kd + 1]),
                                                                           1e-12)}
    ratios.update({title: series(c) for c, title in extra.items() if c in rows[0]})
    panels = {**terms, **ratios}
    ncols = (len(panels) + 1) // 2
    fig, axes = plt.subplots(2, ncols, figsize=(2.6 * ncols, 5), squeeze=False, tight_layout=True)
    for ax, (title, y) in zip(axes.flat, panels.items()):
        ax.plot(series("epoch"), y, marker=".", linewidth=2, markersize=8)
        ax.set_title(title, fontsize=10)
        ax.ticklabel_format(axis="y", useOffset=False)
        if title in ratios:  # shares and factors: from 0, so a flat line reads as flat
            ax.set_ylim(0, 1.1 * max(float(y.max()), 1e-3))
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    path = Path(results_csv).parent / "kd_results.png"
    fig.savefig(path, dpi=150)
    plt.close(fig)
    if on_plot:
        on_plot(path)
    return path


# ---------------------------------------------------------------------------------------------- the command
def options(argv: list[str]) -> SimpleNamespace:
    """The command line as a namespace of `OWN_KEYS` and every yolokd train argument, with their defaults; a
    misspelt key or a bad value is a one-line error."""
    from yolokd.config import check_kd_values, check_number, kd_defaults

    args, kd = parse_kv(argv), kd_defaults()
    for key in args:
        if key not in OWN_KEYS and key not in kd:
            raise SyntaxError(f"'{key}' is not an explain argument.{closest(key, sorted({*OWN_KEYS, *kd}))} See "
                              "`yolokd explain help`.")
    check_kd_values({k: v for k, v in args.items() if k in kd})
    numbers = {"n": (int, ">= 1"), "imgsz": (int, ">= 32"), "dpi": (int, ">= 10"), "conf": (float, "in [0, 1]")}
    args.update({k: check_number(k, args[k], *numbers[k]) for k in numbers if args.get(k) is not None})
    return SimpleNamespace(**{**kd, **OWN_KEYS, **args})


def saved_args(spec) -> dict:
    """The train arguments a checkpoint was trained with (empty for a model .yaml or a missing file)."""
    if not spec or str(spec).endswith((".yaml", ".yml")) or not Path(str(spec)).is_file():
        return {}
    from ultralytics.nn.tasks import torch_safe_load

    return dict(torch_safe_load(str(spec))[0].get("train_args") or {})


def inputs(opt: SimpleNamespace) -> tuple[list[str], nn.Module, nn.Module | None, dict | None, list[Picture]]:
    """Every check of the command (one-line errors, nothing written): the methods, the models, the dataset (`data=`,
    else the one the checkpoints were trained on), the letterboxed images."""
    from ultralytics.utils.checks import check_imgsz

    from yolokd.checks import check_classes, check_strides, load_detector
    from yolokd.data.checks import load_dataset
    from yolokd.data.synthetic import resolve_data
    from yolokd.methods.base import get_method
    from yolokd.trainer import BUILTIN, resolve_method_names

    if not opt.model:
        raise SyntaxError("model= is required: the student, a checkpoint (.pt) or a model .yaml (random init).")
    names = resolve_method_names(opt.method, opt.teacher)
    if BUILTIN in names:
        raise DistillationConfigError("method=ultralytics runs inside Ultralytics' own trainer (distill_model=), "
                                      "where yolokd records nothing: explain one of yolokd's methods.")
    if not names:
        raise DistillationConfigError("nothing to explain: pass teacher= (method= defaults to ld), or method=dicod "
                                      "with cls_teacher=.")
    files = find_images(opt.source) if opt.source else None
    saved = [saved_args(opt.model), saved_args(opt.teacher)]
    data_spec = opt.data or next((a["data"] for a in saved if a.get("data") and Path(a["data"]).exists()), None)
    if files is None and not data_spec:
        raise DistillationConfigError("no images: pass source= (an image, a folder or a glob) or data= (its first "
                                      "n= val images are used).")
    data = load_dataset(resolve_data(data_spec)) if data_spec else None
    teacher = load_detector(opt.teacher, "teacher", nc=data and data["nc"]) if opt.teacher else None
    student = load_detector(opt.model, "student", nc=data["nc"] if data else teacher and len(teacher.names))
    if teacher is not None:
        check_strides(student, teacher)
        if data is not None and not str(opt.teacher).endswith((".yaml", ".yml")):
            check_classes(teacher, data, opt.teacher)
    for n in names:
        get_method(n).check_inputs(vars(opt), data)
    imgsz = opt.imgsz or next((a["imgsz"] for a in saved if a.get("imgsz")), 640)
    imgsz = check_imgsz(imgsz, stride=int(student.stride.max()), max_dim=1)
    pictures = letterbox(files or val_images(data, int(opt.n)), imgsz, data["nc"] if data else len(student.names))
    return names, student, teacher, data, pictures


def trained_adapters(crit, model: str, names: list[str]) -> str:
    """Load into `crit` the adapters of the `kd_state.pt` beside the student checkpoint `model` when it is of the
    same method (the run's trained adapters); say where the adapters come from."""
    from yolokd.trainer import KD_STATE

    path = Path(str(model)).parent / KD_STATE
    if str(model).endswith((".yaml", ".yml")) or not path.is_file():
        return "fresh (no kd_state.pt beside model=)"
    try:
        state = torch.load(path, map_location=next(crit.methods.buffers()).device, weights_only=True)
        if state.get("method") != "+".join(names):
            return f"fresh ({path} is of method={state.get('method')})"
        crit.methods.load_state_dict(state["adapters"])
    except Exception as e:  # damaged, or of other model widths
        return f"fresh ({path} does not fit: {type(e).__name__})"
    return f"from {path}"


def cmd_explain(argv: list[str]) -> int:
    """Check every input (nothing is written before), run the recorded step, write one figure per image."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.files import increment_path
    from ultralytics.utils.torch_utils import select_device

    from yolokd.criterion import build_distillation

    opt = options(argv)
    torch.manual_seed(0)  # a .yaml student or teacher: the same random weights for the same command
    names, student, teacher, data, pictures = inputs(opt)
    device = select_device("" if opt.device is None else opt.device, verbose=False)
    hyp = student.args if isinstance(getattr(student, "args", None), dict) else {}  # a checkpoint's train arguments
    student.args = get_cfg(overrides={k: hyp[k] for k in ("box", "cls", "dfl") if k in hyp})  # the task loss's gains
    student, teacher = student.to(device).float().requires_grad_(True), teacher and teacher.to(device).float().eval()
    opt.data = data["names"] if data else student.names  # DICOD matches its classifier's classes by name
    torch.manual_seed(0)  # fresh adapters, so the same command draws the same figure
    crit = build_distillation(names, student, teacher, opt, device=device)
    adapters = trained_adapters(crit, opt.model, names)
    ex = explain(crit, student, teacher, pictures, float(opt.conf), names=data and data["names"])

    out = Path(opt.out) if opt.out else increment_path(Path("runs") / "explain" / str(opt.name))
    out.mkdir(parents=True, exist_ok=True)
    side = pictures[0].image.shape[0]
    print(f"yolokd explain: method={ex.method}, {len(pictures)} image(s) at {side} px, adapters {adapters}")
    print("  " + "  ".join(f"{k}={v:.4g}" for k, v in ex.items.items()))
    if crit.grad_cap is not None:  # kd_grad_ratio: how hard the capped terms pulled at each tensor, before the cap
        print("  |g_kd| / |g_task| at the student's tensors: "
              + "  ".join(f"{k}={float(v):.3g}" for k, v in crit.grad_cap.pulls.items()))
    for i, p in enumerate(pictures):
        print(f"  {draw(ex, i, out / f'{p.file.stem}_{ex.method}.png', int(opt.dpi))}")
    return 0
