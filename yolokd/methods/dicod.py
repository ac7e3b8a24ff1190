"""DICOD: an image classifier teaches a detector (Guo, Alvarez, Salzmann, NeurIPS 2021).

The teacher is a frozen image classifier trained on ground-truth object crops (`yolokd crops`, then Ultralytics'
classify task). Objects are cut out of the student's own augmented batch by a spatial transformer (slides Eq. 1,
`dicod_ops.crop_boxes`) and resized to the classifier's input size s.

- kd-cls (classification distillation): the classifier's logits z_t on each GT crop supervise the student's class
  logits z_s at the anchors assigned to that GT (student task-aligned positives):
      L_cls = T^2 * mean_pos KL(p_t || p_s),  p_t = softmax(z_t / T),  p_s = sigmoid(z_s / T) / sum_c sigmoid(z_s / T)
  (the authors' `kl-ce` form for sigmoid heads; normalizing p_s leaves TAL's absolute IoU-aware targets alone).
- kd-loc (localization distillation): the crop of the student's decoded box O_p is compared with the crop of its
  GT box O_gt, in pixels and in the classifier's early features f_0 (its first `feat_layers` layers, stride 4):
      L_loc = mean|pool_4(O_p) - pool_4(O_gt)| + mean|pool_8(f_0(O_p)) - pool_8(f_0(O_gt))|
  The GT branch runs under no_grad; the predicted branch backpropagates through the frozen classifier and the
  bilinear sampling into the box coordinates (hence into the student's box head).
Total: 0.4 * L_cls + 0.15 * L_loc (authors' SSD config: T = 2).

Deviations from the authors' code (NVlabs/DICOD, SSD300), and why:
- teacher probabilities are softmax(z_t / T): the Ultralytics classifier is trained with softmax cross-entropy
  (the authors' sigmoid-head variant applied a normalized sigmoid to the teacher too);
- kd-cls uses the student's TAL positives only (the generic mmdet head also pulled negatives to a uniform target);
- kd-loc keeps at most `per_gt` positives per GT (highest target score) and `max_pos` per batch, preferring one per
  GT before a second: crops backpropagate through the classifier, and memory grows with the number of crops
  (the authors ran all positives in chunks of 256);
- the classifier sees [0, 1] RGB crops of the augmented batch, the input it was trained on; predicted boxes are
  not clamped to the image, only kept finite and within one image size of it (see dicod_ops), so a side that
  overshoots the border still gets a gradient;
- Ultralytics names a classifier's classes after its sorted folder names, so its outputs are re-indexed to the
  detector's class order by name (`check_cls_teacher_names`), never assumed to be in the same order.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from yolokd.checks import freeze
from yolokd.config import DistillationConfigError
from yolokd.data.crops import folder_name
from yolokd.methods.base import DistillMethod, StepContext, register
from yolokd.methods.dicod_ops import crop_boxes
from yolokd.taps import Assignment, Features

DEFAULT_CROP = 64
CLS_TEACHER_MODEL = "yolov8n-cls.yaml"  # the classifier teacher yolokd trains (cls_teacher=auto, the benchmark)
AUTO = "auto"  # cls_teacher=auto: yolokd trains the classifier teacher itself, before the run (`auto_cls_teacher`)
AUTO_EPOCHS = 30  # the scratch benchmark's classifier teacher: 89.5 % top-1 on data=synthetic's val crops
_HOWTO = (
    "Pass cls_teacher=auto to have yolokd train one on the detection data's object crops first (a yolov8n-cls, "
    f"{AUTO_EPOCHS} epochs at {DEFAULT_CROP} px), or train your own: `yolokd crops data=<data.yaml> out=crops "
    f"imgsz={DEFAULT_CROP}`, then `yolo classify train model={CLS_TEACHER_MODEL} data=crops imgsz={DEFAULT_CROP}`, "
    "and pass cls_teacher=runs/classify/train/weights/best.pt."
)


# ---------------------------------------------------------------------------------------------- the classifier
def _names(names) -> list[str]:
    return [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)


def load_cls_teacher(spec: str | Path | None) -> tuple[nn.Module, int | None]:
    """Load a trained Ultralytics classifier (`ClassificationModel`); clear errors for anything else.

    Returns:
        (tuple): the model (eval, fp32) and the image size it was trained at (None if the checkpoint does not say).
    """
    if not spec:
        raise DistillationConfigError(
            f"method=dicod needs an image-classifier teacher: add cls_teacher=<classifier .pt>. {_HOWTO}"
        )
    if spec == AUTO:
        raise DistillationConfigError(
            "cls_teacher=auto is trained by `yolokd train` before its run starts; here pass a classifier checkpoint: "
            "the one such a run trained (its log names it: <project>/cls_teacher-<data>-<hash>/train/weights/best.pt) "
            "or your own."
        )
    if str(spec).endswith((".yaml", ".yml")):
        raise DistillationConfigError(
            f"cls_teacher={spec} is a model definition without weights; DICOD needs a trained classifier. {_HOWTO}"
        )
    from ultralytics.nn.tasks import ClassificationModel, load_checkpoint

    from yolokd.checks import resolve_weights

    try:
        path = resolve_weights(spec, "cls_teacher")
    except DistillationConfigError as e:
        raise DistillationConfigError(f"cls_teacher '{spec}' was not found (pass a local .pt path). {_HOWTO}") from e
    try:
        model, ckpt = load_checkpoint(path, inplace=False)  # no in-place activations: gradients flow through it
    except Exception as e:
        raise DistillationConfigError(
            f"cls_teacher checkpoint '{path}' could not be loaded ({type(e).__name__}: {e})."
        ) from e
    if not isinstance(model, ClassificationModel):
        task = getattr(model, "task", type(model).__name__)
        hint = " A detector teacher goes in teacher= (method=dfd+dicod teacher=det.pt cls_teacher=cls.pt)."
        raise DistillationConfigError(
            f"cls_teacher '{spec}' is a '{task}' model, not an image classifier."
            f"{hint if task == 'detect' else ''} {_HOWTO}"
        )
    imgsz = (ckpt.get("train_args") or {}).get("imgsz")  # not model.args: that falls back to Ultralytics' 640
    return model, int(max(imgsz) if isinstance(imgsz, (list, tuple)) else imgsz) if imgsz else None


def cls_teacher_crops(data: str, out: Path, fraction: float = 1.0) -> Path:
    """The classifier teacher's training set: the GT crops of `data` (its first `fraction` of train images) at
    `DEFAULT_CROP` px, cut into `out`, a folder yolokd owns. A finished cut there is kept; one left half-written by a
    killed run is cut again."""
    import shutil

    from yolokd.data.crops import MARKER, make_crops

    if not (out / MARKER).exists():
        shutil.rmtree(out, ignore_errors=True)
        make_crops(data, out, imgsz=DEFAULT_CROP, fraction=fraction)
    return out


def auto_cls_teacher(data: str, args: dict) -> Path:
    """`cls_teacher=auto`: the classifier teacher of `data` (a resolved data yaml), trained here as `_HOWTO` describes
    (`cls_teacher_crops`, then a `CLS_TEACHER_MODEL` for `AUTO_EPOCHS` epochs on the run's device and batch) into
    `<project>/cls_teacher-<data>-<hash of its path>/`, or the one a finished earlier run left there."""
    import hashlib

    from ultralytics import YOLO
    from ultralytics.utils import LOGGER, SETTINGS, colorstr

    path = Path(data).resolve()
    label = path.parent.name if path.stem == "data" else path.stem  # a dataset's folder names it better than data.yaml
    home = Path(args.get("project") or Path(SETTINGS["runs_dir"]) / "detect").resolve()
    home = home / f"cls_teacher-{label}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    best, done = home / "train" / "weights" / "best.pt", home / "finished"
    if done.exists() and best.exists():
        LOGGER.info(f"{colorstr('yolokd:')} cls_teacher=auto: the classifier teacher of {label}, {best}")
        return best
    LOGGER.info(f"{colorstr('yolokd:')} cls_teacher=auto: training the classifier teacher of {label} "
                f"({Path(CLS_TEACHER_MODEL).stem}, {AUTO_EPOCHS} epochs at {DEFAULT_CROP} px on its GT crops) into "
                f"{home}; the next run on the same data reuses it")
    share = args.get("fraction")  # a share of the train images; for Ultralytics' other forms (a count, a list), all
    share = share if isinstance(share, (int, float)) and 0 < share <= 1 else 1.0
    crops = cls_teacher_crops(str(path), home / "crops", fraction=share)
    same = {k: args[k] for k in ("device", "batch", "workers", "seed") if args.get(k) is not None}
    YOLO(CLS_TEACHER_MODEL).train(data=str(crops), imgsz=DEFAULT_CROP, epochs=AUTO_EPOCHS, project=str(home),
                                  name="train", exist_ok=True, plots=False, **same)
    done.write_text(f"{best}\n")
    return best


def check_cls_teacher_names(model: nn.Module, data_names) -> list[int]:
    """Match the classifier's classes to the detection data's classes by name.

    Args:
        model (nn.Module): the classifier (its `names`).
        data_names (dict | list): the detection dataset's class names, in the detector's order.

    Returns:
        (list[int]): `perm` with `perm[j]` = the classifier's output index of data class j.

    Raises:
        DistillationConfigError: when the two sets of names differ (the mismatches are listed).
    """
    c_names = [folder_name(n) for n in _names(model.names)]
    d_names = [folder_name(n) for n in _names(data_names)]
    index = {n: i for i, n in enumerate(c_names)}
    missing, extra = [n for n in d_names if n not in index], [n for n in c_names if n not in set(d_names)]
    if missing or extra:
        raise DistillationConfigError(
            f"the classifier teacher's classes differ from the detection data's: missing {missing[:10]}, extra "
            f"{extra[:10]} ({len(c_names)} vs {len(d_names)} classes). It must be trained on crops of this dataset. "
            f"{_HOWTO}"
        )
    return [index[n] for n in d_names]


def classifier_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pre-softmax class scores of an Ultralytics classifier kept in eval mode.

    `Classify` returns its logits when its own `training` flag is set (all versions); in eval it returns softmax
    (8.0) or (softmax, logits) (8.1+). Setting only the head's flag keeps every layer (BatchNorm, dropout) in eval.
    """
    head = model.model[-1]
    was = head.training
    head.training = True
    try:
        out = model(x)
    finally:
        head.training = was
    return out[-1] if isinstance(out, (tuple, list)) else out


def early_features(model: nn.Module, x: torch.Tensor, n_layers: int) -> torch.Tensor:
    """The classifier's first `n_layers` layers (sequential in Ultralytics classifiers; stride 4 for n_layers=2)."""
    for m in model.model[:n_layers]:
        x = m(x)
    return x


# ---------------------------------------------------------------------------------------------- the losses
def kd_cls_loss(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean_rows KL(softmax(z_t/T) || normalized sigmoid(z_s/T)) for (N, nc) logits (the `kl-ce` form)."""
    log_ps = F.logsigmoid(z_s / temperature)
    log_ps = log_ps - log_ps.logsumexp(1, keepdim=True)
    log_pt = F.log_softmax(z_t / temperature, 1)
    return temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()


def capped_positives(assign: Assignment, per_gt: int, max_total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, a) indices of at most `per_gt` positives per GT (highest target score) and `max_total` in all.

    Beyond `max_total`, each GT's best positive is kept before any GT's second one (then by score).
    """
    b, a = assign.fg_mask.nonzero(as_tuple=True)
    if len(b) == 0:
        return b, a
    score = assign.target_scores[b, a].amax(1)
    key = b * assign.gt_bboxes.shape[1] + assign.target_gt_idx[b, a]
    o = score.argsort(descending=True)
    o = o[key[o].argsort(stable=True)]  # grouped by GT, best first within each group
    k, idx = key[o], torch.arange(len(o), device=o.device)
    new_group = torch.cat((k.new_ones(1, dtype=torch.bool), k[1:] != k[:-1]))
    rank = idx - torch.where(new_group, idx, 0).cummax(0).values  # position inside its GT's group
    o, rank = o[rank < per_gt], rank[rank < per_gt]
    if len(o) > max_total:
        p = score[o].argsort(descending=True)
        o = o[p[rank[p].argsort(stable=True)]][:max_total]
    return b[o], a[o]


def kd_loc_loss(img: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor, batch_idx: torch.Tensor,
                model: nn.Module, size: int, n_layers: int) -> torch.Tensor:
    """Pixel (pool 4) plus early-feature (pool 8) L1 distance between crops of predicted and GT boxes (px xyxy)."""
    o_p = crop_boxes(img, pred, batch_idx, size)
    with torch.no_grad():
        o_gt = crop_boxes(img, gt, batch_idx, size)
        f_gt = F.adaptive_avg_pool2d(early_features(model, o_gt, n_layers), 8)
    pix = (F.adaptive_avg_pool2d(o_p, 4) - F.adaptive_avg_pool2d(o_gt, 4)).abs().mean()
    feat = (F.adaptive_avg_pool2d(early_features(model, o_p, n_layers), 8) - f_gt).abs().mean()
    return pix + feat


# ---------------------------------------------------------------------------------------------- the method
@register
class DICOD(DistillMethod):
    name = "dicod"
    summary = "DICOD: an image classifier (cls_teacher=) on object crops distils class scores and boxes"
    needs_teacher = False
    uses_args = ("cls_teacher", "data")

    @classmethod
    def check_inputs(cls, args: dict, data: dict | None) -> None:
        """The classifier teacher exists, is a classifier, and knows the dataset's classes (`cls_teacher=auto`: it is
        trained after every check has passed, from the dataset's own classes)."""
        if args.get("cls_teacher") == AUTO:
            if data is None:
                raise DistillationConfigError("cls_teacher=auto trains the classifier teacher on the GT crops of the "
                                              "run's data: add data=path/to/data.yaml.")
            return
        model, _ = load_cls_teacher(args.get("cls_teacher"))
        if data is not None:
            check_cls_teacher_names(model, data["names"])

    @classmethod
    def prepare_inputs(cls, args: dict, data: dict | None) -> None:
        """`cls_teacher=auto`: train the classifier teacher now (`auto_cls_teacher`) and pass its path on."""
        if args.get("cls_teacher") == AUTO:
            args["cls_teacher"] = str(auto_cls_teacher(args["data"], args))

    def __init__(self, student: Features, teacher: Features | None, *, cls_teacher: str | nn.Module | None, data,
                 temperature: float, cls_weight: float, loc_weight: float, per_gt: int, max_pos: int,
                 feat_layers: int, crop: int):
        super().__init__()
        model, imgsz = (cls_teacher, None) if isinstance(cls_teacher, nn.Module) else load_cls_teacher(cls_teacher)
        self.classifier = freeze(model)
        nc_s, nc_t = student.scores.shape[1], len(self.classifier.names)
        if nc_s != nc_t:
            raise DistillationConfigError(
                f"the classifier teacher predicts {nc_t} classes but the student detector {nc_s}. {_HOWTO}"
            )
        names = data if isinstance(data, (dict, list)) or data is None else _data_names(data)
        perm = check_cls_teacher_names(self.classifier, names) if names is not None else list(range(nc_t))
        self.register_buffer("perm", torch.tensor(perm, dtype=torch.long), persistent=False)
        self.size = int(crop or imgsz or DEFAULT_CROP)
        layers = self.classifier.model
        if not 0 < feat_layers < len(layers) or any(getattr(m, "f", -1) != -1 for m in layers[:feat_layers]):
            raise DistillationConfigError(
                f"dicod_feat_layers={feat_layers} must select the classifier's first sequential layers "
                f"(1..{len(layers) - 1})"
            )
        self.temperature, self.cls_weight, self.loc_weight = temperature, cls_weight, loc_weight
        self.per_gt, self.max_pos, self.feat_layers = per_gt, max_pos, feat_layers

    def train(self, mode: bool = True):
        """Train mode for the method, never for the frozen classifier (BatchNorm keeps its running statistics)."""
        super().train(mode)
        self.classifier.eval()
        return self

    @torch.no_grad()
    def teacher_logits(self, img: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor, chunk: int = 1024):
        """(N, nc) classifier logits of the box crops, re-indexed to the detector's class order."""
        logits = []
        for i in range(0, len(boxes), chunk):
            crops = crop_boxes(img, boxes[i : i + chunk], batch_idx[i : i + chunk], self.size)
            self.record("crops", crops)  # (n, 3, size, size): what the classifier sees (slides, Eq. 1)
            logits.append(classifier_logits(self.classifier, crops))
        return torch.cat(logits)[:, self.perm]

    def forward(self, s: Features, t: Features | None, ctx: StepContext) -> dict[str, torch.Tensor]:
        zero = 0.0 * s.scores.sum() + 0.0 * s.boxes.sum()  # keeps the graph (DDP) when there is nothing to distil
        a = ctx.assign
        if a is None or not bool(a.fg_mask.any()):
            return {"cls": zero, "loc": zero}
        img = ctx.batch["img"].float()
        if self.perm.device != img.device:  # normally moved with the MethodSet by the trainer
            self.to(img.device)

        # kd-cls: one classifier pass per GT that has positives, shared by all its positives
        b, anc = a.fg_mask.nonzero(as_tuple=True)
        n = a.gt_bboxes.shape[1]
        gt_keys, inv = (b * n + a.target_gt_idx[b, anc]).unique(return_inverse=True)
        gt_images = gt_keys // n
        z_gt = self.teacher_logits(img, a.gt_bboxes.reshape(-1, 4)[gt_keys], gt_images)
        self.record("image", gt_images)  # the image of each crop
        self.record("logits", z_gt)  # (objects, nc): the classifier's logits on the crops, the kd-cls targets
        z_t = z_gt[inv]
        l_cls = kd_cls_loss(s.scores[b, :, anc], z_t, self.temperature)

        # kd-loc: capped positives, crops of decoded student boxes vs crops of their GT boxes
        b, anc = capped_positives(a, self.per_gt, self.max_pos)
        l_loc = kd_loc_loss(img, s.boxes_xyxy[b, anc], a.target_bboxes[b, anc].float(), b, self.classifier,
                            self.size, self.feat_layers)
        return {"cls": self.cls_weight * l_cls, "loc": self.loc_weight * l_loc}


def _data_names(data) -> dict:
    from yolokd.data.checks import load_dataset

    return load_dataset(data)["names"]
