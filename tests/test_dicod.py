"""DICOD (docs/methods.md#dicod): crop op, classifier teacher, kd-cls / kd-loc, config errors, end-to-end runs."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import read_results, save_checkpoint, student_step
from yolokd.config import DistillationConfigError
from yolokd.methods.base import MethodSet, StepContext, build_method
from yolokd.methods.dicod import (
    capped_positives,
    check_cls_teacher_names,
    classifier_logits,
    cls_teacher_crops,
    early_features,
    kd_cls_loss,
    kd_loc_loss,
    load_cls_teacher,
)
from yolokd.methods.dicod_ops import box_theta, clamp_boxes, crop_boxes
from yolokd.taps import Assignment, Features

NAMES = {0: "apple", 1: "bird", 2: "cat"}


@pytest.fixture(scope="module")
def cls_pt(tmp_path_factory) -> Path:
    """A randomly initialised yolov8n-cls checkpoint with 3 named classes."""
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("dicod") / "cls.pt", "yolov8n-cls.yaml", NAMES)


@pytest.fixture(scope="module")
def classifier(cls_pt):
    return load_cls_teacher(cls_pt)[0]


def feats(scores: torch.Tensor, boxes_xyxy: torch.Tensor | None = None) -> Features:
    """Features with given class logits (B, nc, A); `boxes_xyxy` (B, A, 4) px replaces the decoded boxes."""
    b, _, a = scores.shape
    f = Features(neck=[torch.zeros(b, 1, 1, a)], scores=scores, boxes=torch.zeros(b, 4, a),
                 strides=torch.tensor([8.0]), dfl=torch.nn.Identity())
    if boxes_xyxy is not None:
        f.__dict__["boxes_xyxy"] = boxes_xyxy  # overrides the cached decode
    return f


def assignment(fg, gt_idx, gt_boxes, scores=None) -> Assignment:
    """One-image assignment: positives fg (A,), their GT index (A,), GT boxes (n, 4) px, target scores (A,)."""
    fg, gt_idx, gt_boxes = torch.tensor(fg).bool()[None], torch.tensor(gt_idx)[None], torch.tensor(gt_boxes)[None]
    a, n = fg.shape[1], gt_boxes.shape[1]
    ts = torch.zeros(1, a, 1) if scores is None else torch.tensor(scores, dtype=torch.float32).view(1, a, 1)
    return Assignment(fg_mask=fg, target_gt_idx=gt_idx, target_bboxes=gt_boxes[0][gt_idx[0]][None].float(),
                      target_scores=ts, gt_labels=torch.zeros(1, n, 1), gt_bboxes=gt_boxes.float(),
                      mask_gt=torch.ones(1, n, 1))


# ---------------------------------------------------------------------------------------------- crop op
def test_theta_hand_value():
    # box (4, 2, 12, 10) in a 16 x 16 image: scale 8/16 on both axes, centre (8, 6) -> shifts 0 and 12/16 - 1
    theta = box_theta(torch.tensor([[4.0, 2.0, 12.0, 10.0]]), (16, 16))
    assert torch.allclose(theta, torch.tensor([[[0.5, 0.0, 0.0], [0.0, 0.5, -0.25]]]))


def test_identity_crop_reproduces_image():
    img = torch.rand(2, 3, 16, 16)
    out = crop_boxes(img, torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2), torch.tensor([1, 0]), 16)
    assert torch.allclose(out[0], img[1], atol=1e-5) and torch.allclose(out[1], img[0], atol=1e-5)


def test_crop_of_coloured_patch_has_its_colour():
    img = torch.zeros(1, 3, 20, 24)
    colour = torch.tensor([0.2, 0.5, 0.9])
    img[0, :, 2:6, 3:7] = colour.view(3, 1, 1)  # a 4 x 4 patch, x in [3, 7), y in [2, 6)
    box = torch.tensor([[3.0, 2.0, 7.0, 6.0]])
    exact = crop_boxes(img, box, torch.tensor([0]), 4)  # sample points are the patch's pixel centres
    assert torch.allclose(exact, colour.view(1, 3, 1, 1).expand(1, 3, 4, 4), atol=1e-6)
    big = crop_boxes(img, box, torch.tensor([0]), 16)[..., 2:-2, 2:-2]  # inner samples never reach the outside
    assert torch.allclose(big, colour.view(1, 3, 1, 1).expand_as(big), atol=1e-6)


def test_crops_follow_box_order_across_images():
    img = torch.stack([torch.full((3, 8, 8), v) for v in (0.1, 0.7)])
    out = crop_boxes(img, torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 3), torch.tensor([1, 0, 1]), 4)
    assert torch.allclose(out.mean((1, 2, 3)), torch.tensor([0.7, 0.1, 0.7]))


def test_wild_boxes_give_finite_crops_and_gradients():
    img = torch.rand(1, 3, 16, 16)
    boxes = torch.tensor([[-50.0, -50.0, -10.0, -10.0],  # outside
                          [5.0, 5.0, 5.0, 5.0],  # zero size
                          [10.0, 10.0, 2.0, 2.0],  # inverted
                          [100.0, 100.0, 200.0, 200.0],  # outside, beyond the far corner
                          [float("nan"), 0.0, float("inf"), 3.0]], requires_grad=True)
    c = clamp_boxes(boxes.detach(), (16, 16))
    assert torch.isfinite(c).all() and (c[:, 2:] - c[:, :2] >= 1).all() and (c >= -16).all() and (c <= 32).all()
    out = crop_boxes(img, boxes, torch.zeros(5, dtype=torch.long), 8)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(boxes.grad).all()


def test_side_overshooting_the_image_keeps_its_gradient():
    img = torch.rand(1, 3, 16, 16)
    box = torch.tensor([[4.0, 4.0, 24.0, 12.0]], requires_grad=True)  # x2 beyond the right border
    crop_boxes(img, box, torch.tensor([0]), 8).mean().backward()
    assert box.grad[0, 2] != 0


# ---------------------------------------------------------------------------------------------- classifier
def test_softmax_of_logits_equals_classify_eval_output(classifier):
    x = torch.rand(4, 3, 32, 32)
    z = classifier_logits(classifier, x)
    out = classifier(x)  # eval: (softmax, logits) in 8.1+, softmax in 8.0
    probs = out[0] if isinstance(out, (tuple, list)) else out
    assert z.shape == (4, 3) and torch.allclose(z.softmax(1), probs, atol=1e-6)
    assert not classifier.model[-1].training  # the head's flag is restored


def test_early_features_are_stride_4(classifier):
    assert early_features(classifier, torch.rand(2, 3, 32, 32), 2).shape[-2:] == (8, 8)


def test_classifier_frozen_through_training_steps(cls_pt):
    method = build_method("dicod", feats(torch.zeros(1, 3, 4)), None, cls_teacher=str(cls_pt), crop=16)
    method.train()
    assert not method.classifier.training and not any(p.requires_grad for p in method.classifier.parameters())
    before = {k: v.clone() for k, v in method.classifier.state_dict().items()}
    scores = torch.randn(1, 3, 4, requires_grad=True)
    boxes = torch.tensor([[[2.0, 2.0, 14.0, 12.0], [3.0, 3.0, 13.0, 13.0], [0.0, 0.0, 8.0, 8.0], [1.0, 1.0, 9.0, 9.0]]],
                         requires_grad=True)
    a = assignment([1, 1, 0, 1], [0, 0, 0, 1], [[2.0, 2.0, 14.0, 14.0], [0.0, 0.0, 10.0, 10.0]])
    opt = torch.optim.SGD([scores, boxes, *method.parameters()], lr=10.0, momentum=0.9)
    for _ in range(2):
        terms = method(feats(scores, boxes), None, StepContext(batch={"img": torch.rand(1, 3, 16, 16)}, assign=a))
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
    assert boxes.grad.abs().sum() > 0 and scores.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.classifier.parameters())
    after = method.classifier.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm running statistics


def test_class_order_matched_by_name(cls_pt, classifier):
    assert check_cls_teacher_names(classifier, ["cat", "apple", "bird"]) == [2, 0, 1]
    assert check_cls_teacher_names(classifier, NAMES) == [0, 1, 2]
    method = build_method("dicod", feats(torch.zeros(1, 3, 1)), None, cls_teacher=str(cls_pt), data={0: "cat", 1: "apple", 2: "bird"},
                   crop=16)
    img, box, idx = torch.rand(1, 3, 16, 16), torch.tensor([[1.0, 2.0, 11.0, 15.0]]), torch.tensor([0])
    z = classifier_logits(classifier, crop_boxes(img, box, idx, 16))
    assert torch.allclose(method.teacher_logits(img, box, idx), z[:, [2, 0, 1]])


# ---------------------------------------------------------------------------------------------- config errors
def test_missing_cls_teacher_is_refused():
    with pytest.raises(DistillationConfigError, match=r"cls_teacher=.*yolokd crops"):
        build_method("dicod", feats(torch.zeros(1, 3, 1)), None, cls_teacher=None)


def test_detector_as_cls_teacher_is_refused(tmp_path):
    det = save_checkpoint(tmp_path / "det.pt", "yolov8n.yaml", NAMES)
    with pytest.raises(DistillationConfigError, match=r"'detect' model.*teacher=.*yolo classify train"):
        load_cls_teacher(det)


@pytest.mark.parametrize("spec,words", [("yolov8n-cls.yaml", "without weights"), ("nowhere/cls.pt", "not found"),
                                        ("auto", "cls_teacher=auto is trained by `yolokd train` before its run")])
def test_untrained_or_missing_cls_teacher_is_refused(spec, words):
    with pytest.raises(DistillationConfigError, match=words):
        load_cls_teacher(spec)


def test_class_name_mismatch_is_refused(cls_pt, classifier):
    with pytest.raises(DistillationConfigError, match=r"missing \['dog'\], extra \['bird'\].*yolokd crops"):
        check_cls_teacher_names(classifier, ["apple", "dog", "cat"])
    with pytest.raises(DistillationConfigError, match="missing"):
        build_method("dicod", feats(torch.zeros(1, 3, 1)), None, cls_teacher=str(cls_pt), data=["apple", "dog", "cat"])
    with pytest.raises(DistillationConfigError, match="predicts 3 classes but the student detector 4"):
        build_method("dicod", feats(torch.zeros(1, 4, 1)), None, cls_teacher=str(cls_pt))


# ---------------------------------------------------------------------------------------------- kd-cls
def test_kd_cls_hand_value():
    # z_s = 0: normalized sigmoid = (1/2, 1/2); z_t / T = (ln 3, 0): softmax = (3/4, 1/4); times T^2 = 4
    z_t = torch.tensor([[2 * math.log(3.0), 0.0]])
    expected = 4 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    assert torch.isclose(kd_cls_loss(torch.zeros(1, 2), z_t, 2.0), torch.tensor(expected))


def test_kd_cls_zero_on_equal_distributions_and_teacher_shift_invariant():
    z_s, t = torch.randn(5, 4), 2.0
    z_t = t * torch.nn.functional.logsigmoid(z_s / t)  # softmax(z_t / T) = normalized sigmoid(z_s / T)
    assert kd_cls_loss(z_s, z_t, t).abs() < 1e-6
    shifted = kd_cls_loss(z_s, z_t + 3.0, t)  # softmax teacher: a constant shift changes nothing
    assert shifted.abs() < 1e-6
    assert kd_cls_loss(z_s + 3.0, z_t, t) > 1e-3  # sigmoid student: the same shift is a different distribution


def test_kd_cls_gathers_the_assigned_gt_logits(cls_pt, classifier):
    method = build_method("dicod", feats(torch.zeros(1, 3, 4)), None, cls_teacher=str(cls_pt), crop=16)
    gts = [[1.0, 1.0, 9.0, 12.0], [6.0, 4.0, 16.0, 16.0]]
    a = assignment([1, 1, 0, 1], [1, 0, 0, 1], gts)
    img, scores = torch.rand(1, 3, 16, 16), torch.randn(1, 3, 4)
    s = feats(scores, a.target_bboxes.clone())
    out = method(s, None, StepContext(batch={"img": img}, assign=a))
    z_gt = classifier_logits(classifier, crop_boxes(img, torch.tensor(gts), torch.tensor([0, 0]), 16))
    expected = kd_cls_loss(scores[0, :, [0, 1, 3]].T, z_gt[[1, 0, 1]], 2.0)
    assert torch.isclose(out["cls"], 0.4 * expected, atol=1e-6)
    assert out["loc"] == 0  # predicted boxes equal their GT boxes


# ---------------------------------------------------------------------------------------------- kd-loc
def test_kd_loc_zero_at_gt_and_moves_a_shifted_box(classifier):
    img = torch.zeros(1, 3, 32, 32)
    img[0, :, 8:20, 10:22] = torch.tensor([0.9, 0.3, 0.1]).view(3, 1, 1)  # an object on a plain background
    gt = torch.tensor([[10.0, 8.0, 22.0, 20.0]])
    idx = torch.tensor([0])
    assert kd_loc_loss(img, gt.clone(), gt, idx, classifier, 16, 2) == 0
    pred = (gt + torch.tensor([3.0, 0.0, 3.0, 0.0])).requires_grad_()  # shifted right by 3 px
    loss = kd_loc_loss(img, pred, gt, idx, classifier, 16, 2)
    loss.backward()
    assert loss > 0 and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert pred.grad[0, 0] > 0 and pred.grad[0, 2] > 0  # moving the box left (towards the GT) lowers the loss


def test_capped_positives_per_gt_then_per_batch():
    # GT 0 owns anchors 0..4 (scores .1 .5 .3 .9 .2), GT 1 anchors 5, 6 (.4 .6); anchor 7 is negative
    a = assignment([1, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1, 0], [[0.0, 0, 4, 4], [4.0, 4, 8, 8]],
                   scores=[0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.6, 0.8])
    _, anc = capped_positives(a, per_gt=3, max_total=100)
    assert sorted(anc.tolist()) == [1, 2, 3, 5, 6]
    _, anc = capped_positives(a, per_gt=3, max_total=3)  # each GT's best (3, 6) before any second best (1)
    assert sorted(anc.tolist()) == [1, 3, 6]
    empty = assignment([0] * 8, [0] * 8, [[0.0, 0, 4, 4]])
    assert capped_positives(empty, 3, 10)[1].numel() == 0


def test_no_positives_gives_zero_with_graph(cls_pt):
    method = build_method("dicod", feats(torch.zeros(1, 3, 2)), None, cls_teacher=str(cls_pt), crop=16)
    scores = torch.randn(1, 3, 2, requires_grad=True)
    for a in (None, assignment([0, 0], [0, 0], [[0.0, 0, 4, 4]])):
        out = method(feats(scores), None, StepContext(batch={"img": torch.rand(1, 3, 16, 16)}, assign=a))
        assert out["cls"] == 0 and out["loc"] == 0 and out["cls"].requires_grad


# ---------------------------------------------------------------------------------------------- real students
@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo26n.yaml"])
def test_real_student_gradients_reach_the_right_branch(cfg, cls_pt):
    args = SimpleNamespace(method="dicod", cls_teacher=str(cls_pt), data=list(NAMES.values()), dicod_crop=16)
    methods, s, _, ctx, model, loss, items, _ = student_step(cfg, list(NAMES.values()), args)
    assert torch.isfinite(loss).all() and {"kd_loss", "dicod_cls", "dicod_loc"} <= set(items)
    assert items["dicod_cls"] > 0 and items["dicod_loc"] > 0
    head = model.model[-1]
    cls_p, box_p = list(head.cv3.parameters()), list(head.cv2.parameters())
    terms = methods(s, None, ctx)
    for term, yes, no in (("dicod_cls", cls_p, box_p), ("dicod_loc", box_p, cls_p)):
        grads = torch.autograd.grad(terms[term].value, yes + no, allow_unused=True, retain_graph=True)
        norm = [sum(0.0 if g is None else g.abs().sum().item() for g in part)
                for part in (grads[: len(yes)], grads[len(yes) :])]
        assert norm[0] > 0 and norm[1] == 0, term  # kd-cls trains class logits only, kd-loc boxes only


def test_combination_with_a_detector_teacher_method(cls_pt):
    from yolokd.config import kd_defaults

    args = SimpleNamespace(**{**kd_defaults(), "method": "dfd+dicod", "cls_teacher": str(cls_pt), "data": NAMES,
                              "dicod_crop": 16})
    methods, s, t, ctx, _, loss, items, _ = student_step("yolov8n.yaml", list(NAMES.values()), args, "yolov8n.yaml")
    terms = methods(s, t, ctx)
    assert set(terms) == {"dfd_hd", "dfd_ld", "dicod_cls", "dicod_loc"}
    assert all(torch.isfinite(v.value) for v in terms.values()) and torch.isfinite(loss).all()
    assert torch.isclose(items["kd_loss"], sum(items[k] for k in terms))


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def crop_classifier(tiny_data, tmp_path_factory) -> str:
    """Crops of the tiny synthetic set -> a 1-epoch yolov8n-cls classifier at imgsz 32 (as in the README)."""
    from ultralytics import YOLO

    from yolokd.data.crops import make_crops

    root = tmp_path_factory.mktemp("dicod_e2e")
    make_crops(tiny_data, root / "crops", imgsz=32)
    yolo = YOLO("yolov8n-cls.yaml")
    yolo.train(data=str(root / "crops"), imgsz=32, epochs=1, batch=16, workers=0, plots=False, device="cpu",
               project=str(root), name="cls", exist_ok=True, verbose=False)
    return str(yolo.trainer.best)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo26n.yaml"])
def test_end_to_end_crops_classifier_student(cfg, crop_classifier, tiny_data, train_kwargs):
    from ultralytics import YOLO

    from yolokd.trainer import DistillationTrainer

    yolo = YOLO(cfg)
    yolo.train(trainer=DistillationTrainer, data=tiny_data, method="dicod", cls_teacher=crop_classifier,
               name=f"dicod_{Path(cfg).stem}", **train_kwargs)
    rows = read_results(yolo.trainer.save_dir)
    for col in ("train/kd_loss", "train/dicod_cls", "train/dicod_loc"):
        assert all(math.isfinite(r[col]) and r[col] > 0 for r in rows), (col, rows)
    assert all(r["val/kd_loss"] == 0 for r in rows)


def test_cls_teacher_auto_is_trained_once_before_the_run_and_reused(tiny_data, tmp_path, monkeypatch):
    """`cls_teacher=auto`: the crops and a yolov8n-cls trained on them before the run (its folder made after every
    check passed), its path saved in the run's arguments (so a resume finds it); a second run on the same data
    reuses it instead of training again."""
    import yolokd.methods.dicod as dicod
    from ultralytics.nn.tasks import ClassificationModel, load_checkpoint

    from yolokd.data.synthetic import SYNTHETIC_NAMES
    from yolokd.trainer import DistillationTrainer

    monkeypatch.setattr(dicod, "AUTO_EPOCHS", 1)
    args = dict(model="yolov8n.yaml", data=tiny_data, method="dicod", cls_teacher="auto", project=str(tmp_path),
                epochs=1, imgsz=64, batch=8, workers=0, device="cpu", plots=False)
    first = DistillationTrainer(overrides={**args, "name": "a"})
    best = Path(first.args.cls_teacher)
    assert best.name == "best.pt" and best.parent.parent.parent.name.startswith("cls_teacher-")
    model, _ = load_checkpoint(best)
    assert isinstance(model, ClassificationModel) and sorted(model.names.values()) == sorted(SYNTHETIC_NAMES.values())
    stamp = best.stat().st_mtime_ns
    second = DistillationTrainer(overrides={**args, "name": "b"})
    assert Path(second.args.cls_teacher) == best and best.stat().st_mtime_ns == stamp  # reused, not retrained
    with pytest.raises(DistillationConfigError, match="cls_teacher=auto trains the classifier teacher on the GT"):
        DistillationTrainer(overrides={k: v for k, v in args.items() if k != "data"})


def test_cls_teacher_crops_keeps_a_finished_cut_and_redoes_a_half_written_one(tiny_data, tmp_path):
    """The classifier teacher's crops (shared by `cls_teacher=auto` and the benchmark): cut at `DEFAULT_CROP` px; a
    finished cut is reused untouched; a folder a killed cut left without its marker is cut again (make_crops alone
    refuses a non-empty folder without the marker)."""
    from PIL import Image

    from yolokd.data.crops import MARKER
    from yolokd.methods.dicod import DEFAULT_CROP

    out = tmp_path / "crops"
    (out / "train" / "circle").mkdir(parents=True)
    (out / "train" / "circle" / "partial.png").write_bytes(b"")  # what a killed cut leaves: no marker
    assert cls_teacher_crops(tiny_data, out) == out and (out / MARKER).exists()
    assert not (out / "train" / "circle" / "partial.png").exists()
    some = next((out / "train").rglob("*.png"))
    assert Image.open(some).size == (DEFAULT_CROP, DEFAULT_CROP)
    stamp = (out / MARKER).stat().st_mtime_ns
    cls_teacher_crops(tiny_data, out)
    assert (out / MARKER).stat().st_mtime_ns == stamp  # kept, not cut again
