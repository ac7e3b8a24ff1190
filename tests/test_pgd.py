"""PGD: teacher-only Gaussian masks, attentions, hand-computed values, gradient flow (docs/methods.md#pgd)."""

from __future__ import annotations

import math

import pytest
import torch

from yolokd.methods.base import StepContext
from yolokd.methods.pgd import PGD, channel_attention, cls_level_terms, reg_level_terms, spatial_attention
from yolokd.methods.pgd_masks import (
    COV_FLOOR,
    GroundTruth,
    fit_gaussian,
    ground_truth,
    inside_boxes,
    key_region_importance,
    level_index,
    normalise_per_level,
    pgw_masks,
    teacher_quality,
)
from yolokd.taps import Assignment, Features

STRIDES = (8, 16, 32)
HPARAMS = dict(alpha=0.04, beta=0.02, gamma=0.064, delta=8e-4, tau=0.8, xi_cls=0.8, xi_reg=0.6, topk=30,
               level_gain=0.25, ref_area=640 * 640)


def grid(img: int) -> tuple[torch.Tensor, list[int]]:
    """Anchor centres (A, 2) px of a P3-P5 pyramid on an img x img input, and the per-level anchor counts."""
    pts, sizes = [], []
    for s in STRIDES:
        n = img // s
        y, x = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
        pts.append(torch.stack([x.flatten(), y.flatten()], 1) * s)
        sizes.append(n * n)
    return torch.cat(pts), sizes


def features(img: int, b: int = 1, nc: int = 3, c_cls: int = 4, c_box: int = 4, boxes_px=None, logits=None, seed=0):
    """Features of a reg_max=1 head on an img x img input. `boxes_px` (B, A, 4) xyxy px sets the decoded boxes."""
    g = torch.Generator().manual_seed(seed)
    centres, sizes = grid(img)
    a = centres.shape[0]
    ns = [img // s for s in STRIDES]
    stride = torch.cat([torch.full((n,), float(s)) for n, s in zip(sizes, STRIDES)])
    if boxes_px is None:
        boxes_px = torch.cat([centres - 10, centres + 10], 1).expand(b, a, 4)
    ltrb = torch.cat([centres - boxes_px[..., :2], boxes_px[..., 2:] - centres], -1) / stride[:, None]  # grid units
    return Features(
        neck=[torch.zeros(b, 1, n, n) for n in ns],
        scores=torch.randn(b, nc, a, generator=g) if logits is None else logits,
        boxes=ltrb.permute(0, 2, 1).contiguous(),
        strides=torch.tensor([float(s) for s in STRIDES]),
        dfl=torch.nn.Identity(),
        cls_feat=[torch.randn(b, c_cls, n, n, generator=g) for n in ns],
        box_feat=[torch.randn(b, c_box, n, n, generator=g) for n in ns],
    )


def gt_of(boxes: list[list[list[float]]], labels=None) -> GroundTruth:
    """Padded GroundTruth from per-image lists of xyxy boxes (label 0 unless given)."""
    b, n = len(boxes), max((len(x) for x in boxes), default=0)
    out = GroundTruth(torch.zeros(b, n, dtype=torch.long), torch.zeros(b, n, 4), torch.zeros(b, n, dtype=torch.bool))
    for i, bx in enumerate(boxes):
        for j, box in enumerate(bx):
            out.boxes[i, j] = torch.tensor(box)
            out.valid[i, j] = True
            if labels is not None:
                out.labels[i, j] = labels[i][j]
    return out


def ctx_of(gt: GroundTruth, img: int, fg_seed: int = 0) -> StepContext:
    """A StepContext whose assignment carries `gt`; the student-side fields are random (PGD must not read them)."""
    g = torch.Generator().manual_seed(fg_seed)
    b, a = gt.boxes.shape[0], sum((img // s) ** 2 for s in STRIDES)
    assign = Assignment(
        fg_mask=torch.rand(b, a, generator=g) > 0.5,
        target_gt_idx=torch.zeros(b, a, dtype=torch.long),
        target_bboxes=torch.rand(b, a, 4, generator=g) * img,
        target_scores=torch.rand(b, a, 3, generator=g),
        gt_labels=gt.labels[..., None].float(),
        gt_bboxes=gt.boxes,
        mask_gt=gt.valid[..., None].float(),
    )
    return StepContext(batch={"img": torch.zeros(b, 3, img, img)}, assign=assign)


def student_like(t: Features, scale: float = 1.0, seed: int = 1) -> Features:
    """A student with the teacher's shapes and different, grad-carrying features and predictions."""
    g = torch.Generator().manual_seed(seed)

    def noisy(x):
        return (x + scale * torch.randn(x.shape, generator=g)).requires_grad_(True)

    return Features(neck=t.neck, scores=noisy(t.scores), boxes=t.boxes + 1.0, strides=t.strides, dfl=t.dfl,
                    cls_feat=[noisy(x) for x in t.cls_feat], box_feat=[noisy(x) for x in t.box_feat])


# ---------------------------------------------------------------------------------------------------------- masks


def test_quality_hand_value():
    # Eq. 1 at one in-box anchor: p = sigmoid(ln 4) = 0.8 for the GT's class (2), IoU = 0.25 (a quarter-size box
    # in the GT's corner); q = p^(1 - xi) * IoU^xi. The anchor outside the box gets 0 whatever it predicts.
    centres = torch.tensor([[10.0, 10.0], [50.0, 10.0]])
    gt = gt_of([[[0.0, 0.0, 40.0, 40.0]]], [[2]])
    logits = torch.zeros(1, 3, 2)
    logits[0, 2] = math.log(4.0)
    boxes = torch.tensor([[[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 40.0, 40.0]]])
    q_cls, q_reg = teacher_quality(logits, boxes, gt, inside_boxes(centres, gt), (0.8, 0.6))
    assert torch.isclose(q_cls[0, 0, 0], torch.tensor(0.8**0.2 * 0.25**0.8))
    assert torch.isclose(q_reg[0, 0, 0], torch.tensor(0.8**0.4 * 0.25**0.6))
    assert q_cls[0, 0, 1] == 0 and q_reg[0, 0, 1] == 0


def test_known_topk_set_gives_its_gaussian():
    # (1) 64 px image, one GT; the teacher predicts the GT box exactly (IoU 1) only at a 3x3 block of P3 anchors and
    # degenerate boxes (IoU 0) elsewhere, so q > 0 on exactly those 9 anchors: k = min(30, 9) = 9.
    img = 64
    centres, sizes = grid(img)
    gt = gt_of([[[2.0, 2.0, 60.0, 60.0]]])
    block = [r * 8 + c for r in (2, 3, 4) for c in (3, 4, 5)]  # rows y = 20, 28, 36; cols x = 28, 36, 44
    boxes = torch.cat([centres, centres], 1).clone()
    boxes[block] = gt.boxes[0, 0]
    t = features(img, boxes_px=boxes[None], logits=torch.zeros(1, 3, centres.shape[0]))
    (imp, _), _ = pgw_masks(t.scores, t.boxes_xyxy, centres, gt, (0.8, 0.6), topk=30)

    mu, cov = fit_gaussian(centres[block][None], torch.ones(1, 9))
    assert torch.allclose(mu, torch.tensor([[36.0, 28.0]]))  # the block's mean, which is its centre anchor
    var = 6 * 64 / 9 + COV_FLOOR  # MLE variance of {-8, 0, 8} x 3 on each axis, plus the floor
    assert torch.allclose(cov, torch.tensor([[[var, 0.0], [0.0, var]]]))
    assert imp[0, 3 * 8 + 4] == 1  # I(mu) = 1
    assert torch.isclose(imp[0, 2 * 8 + 3], torch.tensor(math.exp(-0.5 * (64 + 64) / var)))  # a corner, by hand
    outside = torch.ones(centres.shape[0], dtype=torch.bool)
    outside[block] = False
    assert (imp[0, block] > 0).all() and (imp[0, outside] == 0).all()


def test_topk_keeps_the_highest_quality_and_max_over_boxes():
    # Crafted q over one level: K = 4 must keep the 4 highest of 6 positives; overlapping boxes take the max.
    centres = torch.tensor([[float(x), 0.0] for x in range(6)])
    q = torch.tensor([[[0.9, 0.8, 0.7, 0.6, 0.2, 0.1], [0.0, 0.0, 0.0, 0.5, 0.5, 0.0]]])
    imp = key_region_importance(q, centres, topk=4)
    assert (imp[0, :4] > 0).all() and imp[0, 5] == 0  # box 0: anchors 0-3; box 1: only 2 positives -> k = 2
    mu, cov = fit_gaussian(torch.tensor([[[3.0, 0.0], [4.0, 0.0]]]), torch.ones(1, 2))
    assert torch.allclose(mu, torch.tensor([[3.5, 0.0]]))
    assert torch.allclose(cov[0, 0, 0], torch.tensor(0.25 + COV_FLOOR))
    box1_at_4 = math.exp(-0.5 * 0.25 / (0.25 + COV_FLOOR))
    assert torch.isclose(imp[0, 4], torch.tensor(box1_at_4))
    # anchor 3 is in both sets: the larger of the two weights wins
    box0_at_3 = math.exp(-0.5 * 1.5**2 / (1.25 + COV_FLOOR))  # box 0 set {0,1,2,3}: mean 1.5, var 1.25
    assert torch.isclose(imp[0, 3], torch.tensor(max(box0_at_3, box1_at_4)))


def test_vectorised_masks_match_a_per_box_reference():
    torch.manual_seed(0)
    img = 128
    centres, _ = grid(img)
    xy = torch.rand(2, 7, 2) * 80
    gt = GroundTruth(torch.randint(0, 3, (2, 7)), torch.cat([xy, xy + 10 + torch.rand(2, 7, 2) * 40], -1),
                     torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool))
    t = features(img, b=2, boxes_px=torch.cat([centres - 12, centres + 20], 1).expand(2, -1, 4))
    (imp, _), _ = pgw_masks(t.scores, t.boxes_xyxy, centres, gt, (0.8, 0.6), topk=5)
    for i in range(2):
        ref = torch.zeros(centres.shape[0])
        for j in range(7):
            if not gt.valid[i, j]:
                continue
            one = GroundTruth(gt.labels[i:i + 1, j:j + 1], gt.boxes[i:i + 1, j:j + 1], gt.valid[i:i + 1, j:j + 1])
            (r, _), _ = pgw_masks(t.scores[i:i + 1], t.boxes_xyxy[i:i + 1], centres, one, (0.8, 0.6), topk=5)
            ref = torch.maximum(ref, r[0])
        assert torch.allclose(imp[i], ref)
        assert 0 < (imp[i] > 0).sum() <= 5 * gt.valid[i].sum()


def test_normalised_masks_sum_per_image_and_level():
    # (2) sum_hw M = mean(I | I > 0) <= 1 and sum_hw N = 1, per image and level.
    img = 128
    centres, sizes = grid(img)
    gt = gt_of([[[10.0, 10.0, 70.0, 50.0], [60.0, 40.0, 120.0, 126.0]], [[0.0, 0.0, 40.0, 90.0]]], [[0, 2], [1]])
    t = features(img, b=2, boxes_px=torch.cat([centres - 16, centres + 16], 1).expand(2, -1, 4))
    (imp, _), bg = pgw_masks(t.scores, t.boxes_xyxy, centres, gt, (0.8, 0.6), topk=30)
    levels = level_index(sizes)
    m, n = normalise_per_level(imp, levels), normalise_per_level(bg.float(), levels)
    for i in range(2):
        for lv, (mi, ni, ii) in enumerate(zip(m[i].split(sizes), n[i].split(sizes), imp[i].split(sizes))):
            if (ii > 0).any():
                assert torch.isclose(mi.sum(), ii[ii > 0].mean()) and mi.sum() <= 1
            else:
                assert mi.sum() == 0
            assert torch.isclose(ni.sum(), torch.tensor(1.0))
            assert (ni > 0).sum() == bg[i].split(sizes)[lv].sum()
    assert (imp[0] > 0).any() and (imp[1] > 0).any()


def test_tall_thin_box_selects_a_vertical_strip():
    # (6) An 8 x 200 px box: the in-box anchors form a vertical strip, 200 px tall. Its 8 px width is enlarged to
    # the assigner's 16 px about x = 102 (94..110): two P3 columns (x = 100, 108) and one P4 column (x = 104). The
    # authors' anchor-free code reads the points as (y, x): it would find a horizontal row.
    img = 256
    centres, sizes = grid(img)
    gt = gt_of([[[98.0, 20.0, 106.0, 220.0]]])
    inside = inside_boxes(centres, gt)[0, 0]
    xs, ys = centres[inside, 0], centres[inside, 1]
    assert inside.sum() == 2 * 24 + 13  # 24 P3 anchors per column (y = 28..212), 13 P4 anchors (y = 24..216), no P5
    assert set(xs.tolist()) == {100.0, 104.0, 108.0} and ys.max() - ys.min() > 180
    t = features(img, boxes_px=gt.boxes[0].expand(1, centres.shape[0], 4))  # IoU 1 everywhere
    (imp, _), bg = pgw_masks(t.scores, t.boxes_xyxy, centres, gt, (0.8, 0.6), topk=30)
    assert (imp[0] > 0).sum() == 30 and inside[imp[0] > 0].all()
    assert torch.equal(bg[0], ~inside)


def test_small_box_between_anchor_centres_still_gets_key_regions():
    # A 6 x 6 px object, x 13..19, y 5..11, holds no anchor centre (P3 centres at 4, 12, 20, ..., P4 at 8, 24, ...,
    # P5 at 16, 48). Enlarged to 16 x 16 about its centre (x 8..24, y 0..16) as Ultralytics' assigner does, it holds
    # the four P3 anchors (12|20, 4|12), and PGD's masks give it key regions. A 40 x 40 box is tested as it is.
    img = 64
    centres, _ = grid(img)
    gt = gt_of([[[13.0, 5.0, 19.0, 11.0], [20.0, 20.0, 60.0, 60.0]]])
    inside = inside_boxes(centres, gt)[0]
    assert sorted(centres[inside[0]].tolist()) == [[12.0, 4.0], [12.0, 12.0], [20.0, 4.0], [20.0, 12.0]]
    x, y = centres[:, 0], centres[:, 1]
    assert torch.equal(inside[1], (x > 20) & (x < 60) & (y > 20) & (y < 60))
    t = features(img, boxes_px=gt.boxes[0, :1].expand(1, centres.shape[0], 4))
    (i_cls, i_reg), _ = pgw_masks(t.scores, t.boxes_xyxy, centres, gt, (0.8, 0.6), topk=30)
    assert i_cls[0, inside[0]].gt(0).all() and i_reg[0, inside[0]].gt(0).all()


def test_many_boxes_give_finite_bounded_masks():
    torch.manual_seed(0)
    img, n = 640, 150
    centres, _ = grid(img)
    xy = torch.rand(2, n, 2) * 600
    gt = GroundTruth(torch.randint(0, 3, (2, n)), torch.cat([xy, xy + 8 + torch.rand(2, n, 2) * 100], -1),
                     torch.ones(2, n, dtype=torch.bool))
    t = features(img, b=2, boxes_px=torch.cat([centres - 20, centres + 20], 1).expand(2, -1, 4))
    (i_cls, i_reg), bg = pgw_masks(t.scores, t.boxes_xyxy, centres, gt, (0.8, 0.6), topk=30)
    assert torch.isfinite(i_cls).all() and i_cls.max() <= 1 and (i_cls > 0).sum() > n


def test_ground_truth_from_batch_matches_the_assignment_layout():
    batch = {"img": torch.zeros(3, 3, 100, 200), "batch_idx": torch.tensor([0.0, 2, 2]),
             "cls": torch.tensor([[1.0], [4], [5]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.1, 0.2], [0.75, 0.25, 0.5, 0.5]])}
    gt = ground_truth(None, batch)
    assert gt.valid.tolist() == [[True, False], [False, False], [True, True]]
    assert torch.allclose(gt.boxes[0, 0], torch.tensor([80.0, 30.0, 120.0, 70.0]))
    assert torch.allclose(gt.boxes[2, 1], torch.tensor([100.0, 0.0, 200.0, 50.0]))
    assert gt.labels[2].tolist() == [4, 5]


# ---------------------------------------------------------------------------------------------------------- losses


def test_attentions_sum_to_c_and_hw():
    # (3) sum_c A = C at every location, sum_hw S = H*W per image.
    f = torch.randn(2, 5, 3, 4) * 3
    a, s = channel_attention(f, 0.8), spatial_attention(f, 0.8)
    assert a.shape == f.shape and torch.allclose(a.sum(1), torch.full((2, 3, 4), 5.0))
    assert s.shape == (2, 3, 4) and torch.allclose(s.sum((1, 2)), torch.full((2,), 12.0))
    # the spatial attention uses the channel MEAN of |F| (authors' code), not the sum of Eq. 7
    g = torch.tensor([[[[1.0, 0.0]], [[-3.0, 4.0]]]])  # C=2, H=1, W=2: mean_c |F| = [2, 2] -> uniform
    assert torch.allclose(spatial_attention(g, 0.8), torch.ones(1, 1, 2))


def hand_case():
    """C=2, H=1, W=2: teacher channels [1, 0] and [0, 2], zero student, tau = 1; returns the values by hand."""
    e = math.e
    s0, s1 = 2 * e**0.5 / (e**0.5 + e), 2 * e / (e**0.5 + e)  # S^T = 2 softmax([0.5, 1.0])
    a00, a10 = 2 * e / (e + 1), 2 / (e + 1)  # A^T at location 0: 2 softmax([1, 0])
    a01, a11 = 2 / (1 + e**2), 2 * e**2 / (1 + e**2)  # A^T at location 1: 2 softmax([0, 2])
    ft = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])
    return ft, torch.zeros_like(ft), (s0, s1, a00, a10, a01, a11)


def test_cls_terms_hand_value():
    ft, fs, (s0, s1, a00, a10, a01, a11) = hand_case()
    fg, bg = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])
    out = cls_level_terms(fs, ft, fg, bg, tau=1.0)
    expected = (
        s0 * a00 * 1.0,  # fg: S^T A^T dF^2 at location 0 (channel 1 has dF = 0)
        s1 * a11 * 4.0,  # bg: location 1, channel 1, dF^2 = 4
        (abs(1 - a00) + abs(1 - a10) + abs(1 - a01) + abs(1 - a11)) / 2,  # student A = 1 everywhere; / (B H W)
        abs(1 - s0) + abs(1 - s1),  # student S = 1 everywhere; / B
    )
    for got, want in zip(out, expected):
        assert torch.isclose(got, torch.tensor(want, dtype=torch.float32))
    # batch mean: the same image twice gives the same values
    out2 = cls_level_terms(fs.repeat(2, 1, 1, 1), ft.repeat(2, 1, 1, 1), fg.repeat(2, 1, 1), bg.repeat(2, 1, 1), 1.0)
    assert all(torch.isclose(x, y) for x, y in zip(out, out2))


def test_reg_terms_hand_value():
    ft, fs, (_, _, a00, a10, _, _) = hand_case()
    fea, att = reg_level_terms(fs, ft, torch.tensor([[[0.5, 0.0]]]), tau=1.0)
    assert torch.isclose(fea, torch.tensor((a00 * 1.0 + a10 * 0.0) / 2 * 0.5))  # mean_c(A^T dF^2) * I, one positive
    assert torch.isclose(att, torch.tensor(abs(1 - a00) + abs(1 - a10)))  # only the positive location counts


def make_pgd(t: Features, s: Features | None = None, **kw) -> PGD:
    return PGD(s or t, t, **{**HPARAMS, **kw})


def test_method_combines_levels_with_the_documented_weights():
    img = 64
    centres, _ = grid(img)
    gt = gt_of([[[4.0, 4.0, 60.0, 36.0]]])
    t = features(img, boxes_px=torch.cat([centres - 12, centres + 12], 1)[None])
    s = student_like(t)
    m = make_pgd(t)
    ctx = ctx_of(gt, img)
    out = m(s, t, ctx)
    fg, bg, ireg = m.masks(t, ctx)
    cls = reg = att = 0.0
    for lv in range(3):
        f, b_, ac, as_ = cls_level_terms(s.cls_feat[lv], t.cls_feat[lv], fg[lv], bg[lv], 0.8)
        fea, ar = reg_level_terms(s.box_feat[lv], t.box_feat[lv], ireg[lv], 0.8)
        cls += (1.0, 1.25, 1.5)[lv] * (0.04 * f + 0.02 * b_)
        reg += 0.064 * fea
        att += 8e-4 * (ac + 100.0 * as_ + ar)  # 640^2 / 64^2 = 100
    for k, v in {"cls": cls, "reg": reg, "att": att}.items():
        assert torch.isclose(out[k], v), k
    assert set(out) == {"cls", "reg", "att"} and all(v > 0 for v in out.values())


def test_identical_features_give_zero_loss():
    # (4) F^S = F^T (same widths -> identity adapters) => every term is exactly 0.
    img = 64
    gt = gt_of([[[4.0, 4.0, 60.0, 36.0]], [[30.0, 10.0, 50.0, 60.0]]])
    t = features(img, b=2)
    s = Features(neck=t.neck, scores=t.scores, boxes=t.boxes, strides=t.strides, dfl=t.dfl,
                 cls_feat=[x.clone().requires_grad_(True) for x in t.cls_feat],
                 box_feat=[x.clone().requires_grad_(True) for x in t.box_feat])
    m = make_pgd(t)
    assert all(isinstance(a, torch.nn.Identity) for a in [*m.align_cls, *m.align_box])
    out = m(s, t, ctx_of(gt, img))
    assert all(v == 0 for v in out.values()), out


def test_empty_ground_truth_gives_zero_fg_and_reg_and_no_nan():
    # (5) no box in the batch: masks empty, fg and reg terms 0; the background term still works. No NaN anywhere.
    img = 64
    t = features(img, b=2)
    s = student_like(t)
    empty = GroundTruth(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool))
    m = make_pgd(t, beta=0.0)
    out = m(s, t, ctx_of(empty, img))
    assert out["cls"] == 0 and out["reg"] == 0 and torch.isfinite(out["att"]) and out["att"] > 0
    sum(out.values()).backward()
    assert all(torch.isfinite(x.grad).all() for x in s.cls_feat + s.box_feat)
    # one image with boxes, one without: the empty image has no fg mask, and its bg mask covers it all.
    gt = gt_of([[[4.0, 4.0, 60.0, 36.0]], []])
    fg, bg, ireg = m.masks(t, ctx_of(gt, img))
    assert all((x[1] == 0).all() for x in fg + ireg) and any((x[0] > 0).any() for x in fg)
    assert all(torch.isclose(x[1].sum(), torch.tensor(1.0)) for x in bg)
    out = make_pgd(t)(s, t, ctx_of(gt, img))
    assert all(torch.isfinite(v) for v in out.values())


def test_masks_ignore_the_student():
    # (7) Masks come from the teacher only: other student predictions, features and assignments change nothing.
    img = 64
    gt = gt_of([[[4.0, 4.0, 60.0, 36.0], [20.0, 30.0, 50.0, 62.0]]], [[0, 2]])
    t = features(img, boxes_px=torch.cat([grid(img)[0] - 12, grid(img)[0] + 12], 1)[None])
    m = make_pgd(t)
    masks_a = m.masks(t, ctx_of(gt, img, fg_seed=0))
    masks_b = m.masks(t, ctx_of(gt, img, fg_seed=1))
    assert all(torch.equal(x, y) for a, b in zip(masks_a, masks_b) for x, y in zip(a, b))
    s1 = student_like(t, seed=1)
    s2 = Features(neck=s1.neck, scores=-s1.scores.detach(), boxes=s1.boxes * 3, strides=s1.strides, dfl=s1.dfl,
                  cls_feat=s1.cls_feat, box_feat=s1.box_feat)  # same features, other predictions
    out1, out2 = m(s1, t, ctx_of(gt, img, fg_seed=0)), m(s2, t, ctx_of(gt, img, fg_seed=1))
    assert all(torch.equal(out1[k], out2[k]) for k in out1)
    # ... while a different teacher prediction does move them (the test can fail)
    t2 = features(img, logits=-t.scores, boxes_px=torch.cat([grid(img)[0] - 4, grid(img)[0] + 30], 1)[None])
    assert not all(torch.equal(x, y) for x, y in zip(m.masks(t2, ctx_of(gt, img))[0], masks_a[0]))


def test_gradients_reach_student_and_adapters_not_teacher():
    img = 64
    gt = gt_of([[[4.0, 4.0, 60.0, 36.0]], [[30.0, 10.0, 50.0, 60.0]]])
    boxes = torch.cat([grid(img)[0] - 12, grid(img)[0] + 12], 1).expand(2, -1, 4)
    t = features(img, b=2, c_cls=6, c_box=4, boxes_px=boxes)
    for x in t.cls_feat + t.box_feat:
        x.requires_grad_(True)
    s = features(img, b=2, c_cls=3, c_box=2, seed=5)
    for x in s.cls_feat + s.box_feat:
        x.requires_grad_(True)
    m = make_pgd(t, s)
    assert all(isinstance(a, torch.nn.Conv2d) for a in [*m.align_cls, *m.align_box])
    out = m(s, t, ctx_of(gt, img))
    for name in ("cls", "reg", "att"):  # each term on its own reaches the student
        grads = torch.autograd.grad(out[name], s.cls_feat + s.box_feat, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    sum(out.values()).backward()
    assert all(a.weight.grad.abs().sum() > 0 for a in [*m.align_cls, *m.align_box])
    assert all(x.grad is None for x in t.cls_feat + t.box_feat)


def test_fp16_inputs_give_finite_fp32_terms():
    img = 64
    gt = gt_of([[[4.0, 4.0, 60.0, 36.0]]])
    t32 = features(img, boxes_px=torch.cat([grid(img)[0] - 12, grid(img)[0] + 12], 1)[None])

    def half(f):  # large fp16 activations: sums over C*H*W would overflow in fp16
        return Features(neck=[x.half() for x in f.neck], scores=f.scores.half() * 8, boxes=f.boxes.half(),
                        strides=f.strides, dfl=f.dfl, cls_feat=[x.half() * 30 for x in f.cls_feat],
                        box_feat=[x.half() * 30 for x in f.box_feat])

    t, s = half(t32), half(student_like(t32))
    out = make_pgd(t32)(s, t, ctx_of(gt, img))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values()) and out["cls"] > 0


# ---------------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pgd_data(tmp_path_factory) -> str:
    from yolokd.data.synthetic import SyntheticSpec, make_dataset

    return str(make_dataset(tmp_path_factory.mktemp("pgd_data"), SyntheticSpec(n_train=16, n_val=8, imgsz=96),
                            progress=False))


@pytest.mark.slow
@pytest.mark.parametrize("student", ["yolov8n.yaml", "yolo26n.yaml"])
def test_pgd_trains_end_to_end(student, pgd_data, train_kwargs):
    from ultralytics import YOLO

    from helpers import read_results
    from yolokd.trainer import DistillationTrainer

    yolo = YOLO(student)
    yolo.train(trainer=DistillationTrainer, data=pgd_data, teacher="yolov8s.yaml", method="pgd",
               name=f"pgd_{student.split('.')[0]}", **{**train_kwargs, "imgsz": 96})
    rows = read_results(yolo.trainer.save_dir)
    for col in ("train/kd_loss", "train/pgd_cls", "train/pgd_reg", "train/pgd_att"):
        assert all(math.isfinite(r[col]) and r[col] > 0 for r in rows), (col, rows)
