"""PDF-Distil, Rank Mimicking, PFI and RM+PFI: hand-computed values, invariances, gradient flow, edge cases
(docs/methods.md#pdf to #rmpfi), a contract test over these four registered methods, and end-to-end smoke runs."""

import copy
import math

import pytest
import torch

from yolokd.config import kd_defaults
from yolokd.methods.base import MethodSet, StepContext, get_method
from yolokd.methods.fitnet import FitNet
from yolokd.methods.pdf import PDFDistil, disagreement, pdf_weights
from yolokd.methods.pfi import PFI, prediction_gap
from yolokd.methods.rm import RankMimicking, group_log_softmax
from yolokd.taps import Assignment, Features

OURS = ["pdf", "rm", "pfi", "rmpfi"]


def feats(neck, scores, boxes=None, strides=(8.0, 16.0, 32.0), dfl=None):
    """Features from hand-made tensors (reg_max = 1 boxes by default: raw ltrb distances in grid units)."""
    b, _, a = scores.shape
    return Features(neck=neck, scores=scores, boxes=torch.zeros(b, 4, a) if boxes is None else boxes,
                    strides=torch.tensor(strides[: len(neck)]), dfl=dfl or torch.nn.Identity())


def ctx(assign=None, b=1, hw=64):
    return StepContext(batch={"img": torch.zeros(b, 3, hw, hw)}, assign=assign)


def assignment(fg, gt_idx, labels, boxes):
    """An Assignment from positives fg (B, A), their GT indices (B, A), GT labels (B, n) and boxes (B, n, 4) px."""
    labels = torch.as_tensor(labels, dtype=torch.float32)
    b, a = fg.shape
    return Assignment(fg_mask=fg.bool(), target_gt_idx=gt_idx.long(), target_bboxes=torch.zeros(b, a, 4),
                      target_scores=torch.zeros(b, a, 1), gt_labels=labels[..., None],
                      gt_bboxes=torch.as_tensor(boxes, dtype=torch.float32), mask_gt=torch.ones(*labels.shape, 1))


def logit(*p):
    return torch.logit(torch.tensor(p, dtype=torch.float64)).float()


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def softmax(x):
    e = [math.exp(v) for v in x]
    return [v / sum(e) for v in e]


# ------------------------------------------------------------------------------------------------ PDF-Distil
def pdf_case():
    """Two levels, 1x2 and 1x1, nc = 2, C = 1; F = (X^t - X^s)^2 = [1, 9 | 4]."""
    zs = logit(0.1, 0.1, 0.1).expand(1, 2, 3).clone()  # student p = 0.1 everywhere
    zt = torch.stack([logit(0.4, 0.1, 0.6), logit(0.5, 0.6, 0.6)])[None]  # dp = (0.3, 0.4), (0, 0.5), (0.5, 0.5)
    s = feats([torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 1)], zs)
    t = feats([torch.tensor([[[[1.0, 3.0]]]]), torch.full((1, 1, 1, 1), 2.0)], zt)
    return s, t


def test_disagreement_hand_values():
    s, t = pdf_case()
    assert torch.allclose(disagreement(s.scores, t.scores, "l2"), torch.tensor([[0.5, 0.5, 0.5**0.5]]))
    assert torch.allclose(disagreement(s.scores, t.scores, "l1"), torch.tensor([[0.7, 0.5, 1.0]]))
    bkl = lambda pt, ps: pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))  # KL(teacher || student)
    expected = [bkl(0.4, 0.1) + bkl(0.5, 0.1), bkl(0.1, 0.1) + bkl(0.6, 0.1), 2 * bkl(0.6, 0.1)]
    assert torch.allclose(disagreement(s.scores, t.scores, "kl"), torch.tensor([expected]), atol=1e-6)


@pytest.mark.parametrize("kind,level1", [("l2", (1 + 9) / 2), ("l1", (7 / 6 * 1 + 5 / 6 * 9) / 2)])
def test_pdf_hand_value(kind, level1):
    # level 1: D = (0.5, 0.5) [l2] -> W = (1, 1); D = (0.7, 0.5) [l1] -> W = (7/6, 5/6). Level 2: one position, W = 1.
    s, t = pdf_case()
    m = PDFDistil(s, t, weight=5.0, disagreement=kind, projector="conv")
    assert torch.isclose(m(s, t, ctx())["loss"], torch.tensor(5.0 * (level1 + 4.0) / 2))


def test_pdf_zero_when_adapted_student_equals_teacher():
    torch.manual_seed(0)
    neck = [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2)]
    s = feats(neck, torch.randn(2, 3, 20))
    m = PDFDistil(s, feats(neck, torch.randn(2, 3, 20)), weight=5.0, disagreement="l2", projector="conv")
    assert m(s, feats([x.clone() for x in neck], torch.randn(2, 3, 20)), ctx(b=2))["loss"] == 0


def test_pdf_weights_mean_one_and_scale_invariant():
    torch.manual_seed(0)
    d = torch.rand(3, 17)
    d[1] = 0  # full agreement on image 1: uniform weights
    w = pdf_weights(d)
    assert torch.allclose(w.mean(1), torch.ones(3)) and torch.equal(w[1], torch.ones(17))
    assert torch.allclose(pdf_weights(d * 37.0), w)
    assert torch.allclose(w[0], 17 * d[0] / d[0].sum())


def test_pdf_no_gradient_to_student_logits():
    torch.manual_seed(0)
    zs = torch.randn(2, 3, 20, requires_grad=True)
    s = feats([torch.randn(2, 4, 4, 4, requires_grad=True), torch.randn(2, 4, 2, 2)], zs)
    t = feats([torch.randn(2, 6, 4, 4), torch.randn(2, 6, 2, 2)], torch.randn(2, 3, 20))
    loss = PDFDistil(s, t, weight=5.0, disagreement="l2", projector="conv")(s, t, ctx(b=2))["loss"]
    g_z, g_x = torch.autograd.grad(loss, [zs, s.neck[0]], allow_unused=True)
    assert g_z is None and g_x.abs().sum() > 0


def test_pdf_uniform_disagreement_equals_fitnet():
    torch.manual_seed(0)
    s_neck = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    t_neck = [torch.randn(2, 5, 4, 4), torch.randn(2, 5, 2, 2)]
    s = feats(s_neck, torch.zeros(2, 2, 20))
    t = feats(t_neck, torch.ones(2, 2, 20))  # the same disagreement at every position
    pdf, fit = PDFDistil(s, t, weight=5.0, disagreement="l2", projector="conv"), FitNet(s, t, weight=5.0, kd_weight=0.0, hint_share=1.0, projector="conv", pearson=False)
    fit.align.load_state_dict(pdf.align.state_dict())
    assert torch.isclose(pdf(s, t, ctx(b=2))["loss"], fit(s, t, ctx(b=2))["ht"])


def test_pdf_rejects_unknown_disagreement():
    s, t = pdf_case()
    with pytest.raises(ValueError, match="pdf_disagreement"):
        PDFDistil(s, t, weight=5.0, disagreement="l3", projector="conv")


# ------------------------------------------------------------------------------------------------ PFI
@pytest.mark.parametrize("faithful", [False, True])
@pytest.mark.parametrize("detach", [False, True])  # the gradient path changes, the value does not
def test_pfi_hand_value(faithful, detach):
    # P_dif = (0.01, 0.04 | 0.09), F_dif = (1, 9 | 4).
    zs = torch.zeros(1, 1, 3)
    zt = logit(0.6, 0.7, 0.8)[None, None]
    s = feats([torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 1)], zs)
    t = feats([torch.tensor([[[[1.0, 3.0]]]]), torch.full((1, 1, 1, 1), 2.0)], zt)
    if faithful:  # Eq. 9: mean_hw (P_dif * F_dif)^2 per level, mean over levels
        expected = ((0.01 * 1) ** 2 + (0.04 * 9) ** 2) / 2 / 2 + (0.09 * 4) ** 2 / 2
    else:  # w = P_dif / c, c = max(mean P_dif = 0.14 / 3, E_t = mean p_t^2 = (0.36 + 0.49 + 0.64) / 3) = E_t
        w = [p / (1.49 / 3) for p in (0.01, 0.04, 0.09)]
        expected = (w[0] * 1 + w[1] * 9) / 2 / 2 + w[2] * 4 / 2
    m = PFI(s, t, weight=1.5, faithful=faithful, detach=detach)
    assert torch.isclose(m(s, t, ctx())["loss"], torch.tensor(1.5 * expected), rtol=1e-5)


def test_pfi_normalisation_is_global_over_the_batch():
    # Image 2's student features equal the teacher's (F_dif = 0), so it adds nothing itself; but its teacher is more
    # confident, which raises the batch's one normaliser c = max(mean P_dif, E_t) and so lowers image 1's weights.
    # A per-image normalisation would give exactly half of image 1's loss.
    torch.manual_seed(0)
    zs, zt = torch.randn(1, 3, 20), torch.randn(1, 3, 20)
    zt2 = zt + 3.0
    ns, nt = [torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)], [torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)]
    one = PFI(feats(ns, zs), feats(nt, zt), weight=1.5, faithful=False, detach=False)
    two = lambda x, y: [torch.cat([a, b]) for a, b in zip(x, y)]
    same = [torch.randn_like(x) for x in nt]
    s2, t2 = feats(two(ns, same), torch.cat([zs, zs])), feats(two(nt, same), torch.cat([zt, zt2]))
    p1, p2 = (zs.sigmoid() - zt.sigmoid()).pow(2).mean(1), (zs.sigmoid() - zt2.sigmoid()).pow(2).mean(1)
    c1 = max(p1.mean(), zt.sigmoid().pow(2).mean())
    c2 = max(torch.cat([p1, p2]).mean(), torch.cat([zt, zt2]).sigmoid().pow(2).mean())
    assert c2 > c1 * 1.5  # the second image really moves the normaliser
    l1 = one(feats(ns, zs), feats(nt, zt), ctx())["loss"]
    assert torch.isclose(one(s2, t2, ctx(b=2))["loss"], l1 / 2 * c1 / c2, rtol=1e-5)


def test_pfi_zero_when_predictions_agree_and_detached_gap_gives_no_logit_gradient():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 20)
    zs = z.clone().requires_grad_(True)
    s = feats([torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 2, 2)], zs)
    t = feats([torch.randn(2, 5, 4, 4), torch.randn(2, 5, 2, 2)], z)
    for faithful in (False, True):
        for detach in (False, True):
            assert PFI(s, t, weight=1.5, faithful=faithful, detach=detach)(s, t, ctx(b=2))["loss"] == 0
    t = feats(t.neck, torch.randn(2, 3, 20))
    loss = PFI(s, t, weight=1.5, faithful=False, detach=True)(s, t, ctx(b=2))["loss"]
    g_z, g_x = torch.autograd.grad(loss, [zs, s.neck[0]], allow_unused=True)
    assert g_z is None and g_x.abs().sum() > 0 and loss > 0


def test_pfi_undetached_gap_trains_the_logits_by_hand():
    # One level of 1x2 positions, nc = 2, F_dif = (1, 9). With `detach=False`, dL/dz_s[c, a] =
    # beta * F_dif[a] / (HW * c) * (2 / nc) * (p_s - p_t) * p_s * (1 - p_s), the normaliser c held constant:
    # c = max(mean P_dif = 0.0525, E_t = mean p_t^2 = 0.4775) = E_t.
    zs = torch.zeros(1, 2, 2, requires_grad=True)  # p_s = 0.5 everywhere
    zt = torch.stack([logit(0.6, 0.9), logit(0.7, 0.5)])[None]
    s = feats([torch.zeros(1, 1, 1, 2)], zs)
    t = feats([torch.tensor([[[[1.0, 3.0]]]])], zt)
    (g_z,) = torch.autograd.grad(PFI(s, t, weight=1.5, faithful=False, detach=False)(s, t, ctx())["loss"], [zs])
    pt = torch.tensor([[0.6, 0.9], [0.7, 0.5]])
    assert math.isclose(((0.5 - pt) ** 2).mean(), 0.0525, rel_tol=1e-6) and math.isclose(pt.pow(2).mean(), 0.4775, rel_tol=1e-6)
    expected = 1.5 * torch.tensor([1.0, 9.0]) / (2 * 0.4775) * (2 / 2) * (0.5 - pt) * 0.25
    assert torch.allclose(g_z[0], expected, rtol=1e-5)


def test_pfi_weights_average_at_most_one():
    # With F_dif = 1 everywhere on a single level, the loss is beta * mean(w) = beta * mean(P_dif) / c: beta when the
    # student's false positives outweigh the teacher (c = mean P_dif), less when it misses part of what the teacher sees.
    torch.manual_seed(0)
    p = prediction_gap(torch.randn(2, 3, 20), torch.randn(2, 3, 20))
    assert p.shape == (2, 20)
    s_neck, t_neck = [torch.zeros(2, 1, 4, 5)], [torch.ones(2, 1, 4, 5)]
    zt = torch.full((2, 3, 20), -6.0)  # the teacher sees nothing: E_t = sigmoid(-6)^2
    zs = torch.randn(2, 3, 20) + 2  # the student fires everywhere
    s, t = feats(s_neck, zs), feats(t_neck, zt)
    assert torch.isclose(PFI(s, t, weight=1.5, faithful=False, detach=False)(s, t, ctx(b=2))["loss"], torch.tensor(1.5))
    zs = zt + 0.1  # close to the teacher: mean P_dif << E_t
    s = feats(s_neck, zs)
    expected = 1.5 * prediction_gap(zs, zt).mean() / zt.sigmoid().pow(2).mean()
    loss = PFI(s, t, weight=1.5, faithful=False, detach=False)(s, t, ctx(b=2))["loss"]
    assert torch.isclose(loss, expected, rtol=1e-5) and loss < 0.1


def test_pfi_logit_gradient_falls_with_the_gap():
    # The toy case: the student's logits approach the teacher's, the gap shrinking 100x. The gradient on the
    # student's logits must shrink with it (it grew 100x when w was normalised by mean P_dif alone) and stay below
    # beta * max F_dif / (2 C E_t) per anchor, divided by the anchors averaged over.
    torch.manual_seed(0)
    zt = torch.randn(2, 3, 20)
    neck_s, neck_t = [torch.zeros(2, 1, 4, 5)], [torch.randn(2, 1, 4, 5)]
    norms = []
    for gap in (1.0, 0.01):
        zs = (zt + gap * torch.randn(2, 3, 20, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
        s, t = feats(neck_s, zs), feats(neck_t, zt)
        (g,) = torch.autograd.grad(PFI(s, t, weight=1.5, faithful=False, detach=False)(s, t, ctx(b=2))["loss"], [zs])
        bound = 1.5 * neck_t[0].pow(2).max() / (2 * 3 * zt.sigmoid().pow(2).mean()) / 40
        assert g.abs().max() <= bound
        norms.append(g.norm())
    assert norms[1] < norms[0] / 50


# ------------------------------------------------------------------------------------------------ Rank Mimicking
def rm_case():
    """One 2x2 level (stride 8, anchors at (4,4), (12,4), (4,12), (12,12) px), nc = 2.

    GT 0 = [0, 0, 16, 16] class 1, positives 0, 1, 2; GT 1 = [8, 8, 16, 16] class 0, a single positive (3).
    Student: class-1 logits 0 (uniform rank), boxes = GT 0 (IoU 1). Teacher: logits log(1, 2, 5) (rank 1/8, 2/8,
    5/8) and boxes of IoU 1, 0.5, 0.25 with GT 0.
    """
    zs = torch.zeros(1, 2, 4)
    zt = torch.zeros(1, 2, 4)
    zt[0, 1, :3] = torch.tensor([1.0, 2.0, 5.0]).log()
    bs = torch.tensor([[0.5, 1.5, 0.5, 0.5], [0.5, 0.5, 1.5, 0.5], [1.5, 0.5, 1.5, 0.5], [1.5, 1.5, 0.5, 0.5]])
    bt = torch.tensor([[0.5, 1.5, 0.5, 0.5], [0.5, 0.5, 1.5, 0.5], [1.5, 0.5, 0.5, 0.5], [1.5, 0.5, -0.5, 0.5]])
    s = feats([torch.zeros(1, 1, 2, 2)], zs, bs[None])  # boxes (B, 4, A): rows l, t, r, b in grid units
    t = feats([torch.zeros(1, 1, 2, 2)], zt, bt[None])
    a = assignment(torch.tensor([[1, 1, 1, 1]]), torch.tensor([[0, 0, 0, 1]]), [[1, 0]],
                   [[[0, 0, 16, 16], [8, 8, 16, 16]]])
    return s, t, a


def rm(weight=4.0, loc_weight=1.0, tau=1.0):
    s, t, _ = rm_case()
    return RankMimicking(s, t, weight=weight, loc_weight=loc_weight, loc_temperature=tau, scores="logit", temperature=1.0)


def test_rm_boxes_of_hand_case():
    s, t, _ = rm_case()
    assert torch.allclose(t.boxes_xyxy[0, :3], torch.tensor([[0.0, 0, 16, 16], [0, 0, 16, 8], [0, 0, 8, 8]]))
    assert torch.allclose(s.boxes_xyxy[0, :3], torch.tensor([[0.0, 0, 16, 16]]).expand(3, 4))


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_rm_hand_value_single_positive_gt_excluded(tau):
    s, t, a = rm_case()
    out = rm(tau=tau)(s, t, ctx(a))
    # M = 1: GT 1 has one positive and does not count (M = 2 would halve both terms)
    assert torch.isclose(out["cls"], torch.tensor(4.0 * kl([1 / 8, 2 / 8, 5 / 8], [1 / 3] * 3)), rtol=1e-5)
    assert torch.isclose(out["loc"], torch.tensor(4.0 * kl(softmax([1 / tau, 0.5 / tau, 0.25 / tau]), [1 / 3] * 3)),
                         rtol=1e-4)
    assert rm(loc_weight=0.0)(s, t, ctx(a))["loc"] == 0


def test_rm_groups_are_per_image():
    # Two images, each with GT index 0 and two positives: two groups, not one group of four.
    zs = torch.zeros(2, 1, 4)
    zt = torch.tensor([[[0.0, 1.0, 0, 0]], [[0.0, 3.0, 0, 0]]])
    s, t = feats([torch.zeros(2, 1, 2, 2)], zs), feats([torch.zeros(2, 1, 2, 2)], zt)
    fg = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])
    a = assignment(fg, torch.zeros(2, 4), [[0], [0]], [[[0, 0, 16, 16]], [[0, 0, 16, 16]]])
    m = RankMimicking(s, t, weight=1.0, loc_weight=0.0, loc_temperature=1.0, scores="logit", temperature=1.0)
    expected = (kl(softmax([0, 1]), [0.5, 0.5]) + kl(softmax([0, 3]), [0.5, 0.5])) / 2
    assert torch.isclose(m(s, t, ctx(a, b=2))["cls"], torch.tensor(expected), rtol=1e-5)


def test_rm_prob_scores_rank_sigmoid_probabilities():
    # one GT, two positives; teacher logits (0, 0): probabilities (1/2, 1/2), a uniform rank either way;
    # student logits (ln 3, 0): probabilities (3/4, 1/2). logit: softmax(ln 3, 0) = (3/4, 1/4); prob: softmax(3/4, 1/2)
    zs, zt = torch.tensor([[[math.log(3.0), 0.0]]]), torch.zeros(1, 1, 2)
    s, t = feats([torch.zeros(1, 1, 1, 2)], zs), feats([torch.zeros(1, 1, 1, 2)], zt)
    a = assignment(torch.tensor([[1, 1]]), torch.zeros(1, 2), [[0]], [[[0, 0, 16, 16]]])

    def cls_term(scores, temperature=1.0):
        return RankMimicking(s, t, weight=1.0, loc_weight=0.0, loc_temperature=1.0, scores=scores,
                             temperature=temperature)(s, t, ctx(a))["cls"]

    assert torch.isclose(cls_term("logit"), torch.tensor(kl([0.5, 0.5], [0.75, 0.25])), rtol=1e-5)  # 0.1438
    e = math.exp(0.25)
    assert torch.isclose(cls_term("prob"), torch.tensor(kl([0.5, 0.5], [e / (e + 1), 1 / (e + 1)])), rtol=1e-5)  # 0.0078
    # a temperature divides the ranked values: logit at T = 2 ranks (ln 3 / 2, 0), prob at T = 0.1 ranks (7.5, 5)
    assert torch.isclose(cls_term("logit", 2.0), torch.tensor(kl([0.5, 0.5], softmax([math.log(3) / 2, 0]))), rtol=1e-5)
    assert torch.isclose(cls_term("prob", 0.1), torch.tensor(kl([0.5, 0.5], softmax([7.5, 5.0]))), rtol=1e-5)
    with pytest.raises(Exception, match="rm_scores='z'"):
        RankMimicking(s, t, weight=1.0, loc_weight=0.0, loc_temperature=1.0, scores="z", temperature=1.0)


def test_rm_prob_ranks_are_nearly_inert_without_a_temperature():
    # The largest rank KL sigmoid probabilities can give on two candidates: the teacher certain of one (p = 1, 0),
    # the student of the other (0, 1). Softmax of values in [0, 1] stays near uniform, so the KL is at most
    # (e - 1) / (e + 1) * 1 = 0.46 in the extreme case and about 0.1 for realistic gaps; logits carry the ranking.
    zs, zt = torch.tensor([[[-9.0, 9.0]]]), torch.tensor([[[9.0, -9.0]]])
    s, t = feats([torch.zeros(1, 1, 1, 2)], zs), feats([torch.zeros(1, 1, 1, 2)], zt)
    a = assignment(torch.tensor([[1, 1]]), torch.zeros(1, 2), [[0]], [[[0, 0, 16, 16]]])

    def cls_term(scores):
        return RankMimicking(s, t, weight=1.0, loc_weight=0.0, loc_temperature=1.0, scores=scores,
                             temperature=1.0)(s, t, ctx(a))["cls"]

    assert cls_term("prob") < 0.47 < 10 < cls_term("logit")


def test_rm_candidates_are_the_positives_of_both_models():
    # Two anchors are student positives of GT 0 (0, 1); the teacher's assignment makes anchors 1 and 3 positive for
    # it. The candidates are {0, 1, 3}: anchor 1 counted once, anchor 3 (the teacher's pick, which the student does
    # not rank as a positive) joins the group. Teacher logits (0, 1, _, 2) -> rank softmax(0, 1, 2); student uniform.
    zs = torch.zeros(1, 1, 4)
    zt = torch.tensor([[[0.0, 1.0, 5.0, 2.0]]])
    s, t = feats([torch.zeros(1, 1, 2, 2)], zs), feats([torch.zeros(1, 1, 2, 2)], zt)
    student = assignment(torch.tensor([[1, 1, 0, 0]]), torch.zeros(1, 4), [[0]], [[[0, 0, 16, 16]]])
    teacher = assignment(torch.tensor([[0, 1, 0, 1]]), torch.zeros(1, 4), [[0]], [[[0, 0, 16, 16]]])
    m = RankMimicking(s, t, weight=1.0, loc_weight=0.0, loc_temperature=1.0, scores="logit", temperature=1.0)
    alone = m(s, t, StepContext(batch={"img": torch.zeros(1, 3, 16, 16)}, assign=student))["cls"]
    both = m(s, t, StepContext(batch={"img": torch.zeros(1, 3, 16, 16)}, assign=student, teacher_assign=teacher))
    assert torch.isclose(alone, torch.tensor(kl(softmax([0, 1]), [0.5, 0.5])), rtol=1e-5)
    assert torch.isclose(both["cls"], torch.tensor(kl(softmax([0, 1, 2]), [1 / 3] * 3)), rtol=1e-5)
    # the same assignment twice (LAD: the task assignment is the teacher's) gives the student's groups unchanged
    same = m(s, t, StepContext(batch={"img": torch.zeros(1, 3, 16, 16)}, assign=student, teacher_assign=student))
    assert torch.isclose(same["cls"], alone)


def test_group_log_softmax_matches_per_group_softmax():
    x = torch.tensor([1.0, 5.0, -2.0, 0.5, 300.0, 299.0])
    g = torch.tensor([0, 1, 0, 0, 1, 2])
    out = group_log_softmax(x, g, 3)
    assert torch.allclose(out[[0, 2, 3]], x[[0, 2, 3]].log_softmax(0))
    assert torch.allclose(out[[1, 4]], x[[1, 4]].log_softmax(0)) and out[5] == 0


def test_rm_shift_invariance_zero_at_agreement_and_permutation_sensitivity():
    s, t, a = rm_case()
    m = rm()
    base = m(s, t, ctx(a))["cls"]
    shifted = s.scores.clone()
    shifted[0, :, :3] += 7.0  # a constant on every student logit of GT 0's positives
    assert torch.isclose(m(feats(s.neck, shifted, s.boxes), t, ctx(a))["cls"], base)
    # student = teacher on the positives (elsewhere they differ): both terms 0
    same = t.scores.clone()
    same[0, 0, :] = torch.randn(4)  # other class: ignored
    out = m(feats(s.neck, same, t.boxes), t, ctx(a))
    assert out["cls"] == 0 and out["loc"] == 0
    # permuting the student's logits inside GT 0 changes the loss (independent sorting would hide it)
    zs = t.scores.clone()
    perm = zs.clone()
    perm[0, 1, :3] = zs[0, 1, [2, 0, 1]]
    assert m(feats(s.neck, perm, s.boxes), t, ctx(a))["cls"] > 1e-3


def test_rm_gradient_only_on_positives_and_their_class():
    s, t, a = rm_case()
    zs = torch.randn(1, 2, 4, requires_grad=True)
    boxes = (t.boxes + 0.1 * torch.randn(1, 4, 4)).requires_grad_(True)
    out = rm()(feats(s.neck, zs, boxes), t, ctx(a))
    (gz,) = torch.autograd.grad(out["cls"], zs)
    mask = torch.zeros_like(gz, dtype=torch.bool)
    mask[0, 1, :3] = True  # GT 0's class at its positives; GT 1 (single positive) gets nothing
    assert gz[~mask].abs().max() == 0 and gz[mask].abs().min() > 0
    (gb,) = torch.autograd.grad(out["loc"], boxes)
    assert gb[0, :, 3].abs().max() == 0 and gb[0, :, :3].abs().sum() > 0


# ------------------------------------------------------------------------------------------------ realistic cases
def random_case(reg_max=16, n_gt=(3, 0), nc=3, img=64, seed=0, teacher_grad=False):
    """Random features of a 3-level head at `img` px and the real task-aligned assignment of the student."""
    from ultralytics.nn.modules.block import DFL
    from ultralytics.utils.tal import TaskAlignedAssigner

    g = torch.Generator().manual_seed(seed)
    b = len(n_gt)
    shapes = [(img // st, img // st) for st in (8, 16, 32)]
    a_total = sum(h * w for h, w in shapes)

    def side(widths, grad):
        neck = [torch.randn(b, c, h, w, generator=g).requires_grad_(grad) for c, (h, w) in zip(widths, shapes)]
        scores = torch.randn(b, nc, a_total, generator=g).requires_grad_(grad)
        if reg_max > 1:
            boxes = torch.randn(b, 4 * reg_max, a_total, generator=g)
        else:
            boxes = torch.rand(b, 4, a_total, generator=g) * 2 + 0.3
        return feats(neck, scores, boxes.requires_grad_(grad), dfl=DFL(reg_max) if reg_max > 1 else None)

    s, t = side((4, 8, 8), True), side((8, 16, 16), teacher_grad)
    n = max(max(n_gt), 1)
    xy = torch.rand(b, n, 2, generator=g) * img * 0.6
    wh = torch.rand(b, n, 2, generator=g) * img * 0.4 + 10
    gt_boxes = torch.cat([xy, (xy + wh).clamp(max=img)], -1)
    mask = (torch.arange(n)[None] < torch.tensor(n_gt)[:, None]).float()[..., None]
    labels = torch.randint(0, nc, (b, n, 1), generator=g).float() * mask
    gt_boxes = gt_boxes * mask
    anchors, strides = s.anchors
    with torch.no_grad():
        _, tb, ts, fg, idx = TaskAlignedAssigner(topk=10, num_classes=nc, alpha=0.5, beta=6.0)(
            s.scores.detach().sigmoid().permute(0, 2, 1), s.boxes_xyxy.detach(), anchors * strides, labels, gt_boxes,
            mask,
        )
    del s.__dict__["boxes_xyxy"]  # computed above without grad; recompute inside the method
    assign = Assignment(fg.bool(), idx, tb, ts, labels, gt_boxes, mask)
    return s, t, StepContext(batch={"img": torch.zeros(b, 3, img, img)}, assign=assign)


def build(name, s, t, **over):
    """A registered method built the way MethodSet builds it, from the train-argument defaults."""
    args = {**kd_defaults(), **over}
    return MethodSet([name], s, t, type("Args", (), args)).methods[name]


@pytest.mark.parametrize("reg_max", [16, 1])
@pytest.mark.parametrize("name", OURS)
def test_contract(name, reg_max):
    s, t, c = random_case(reg_max, teacher_grad=True)
    assert c.assign.fg_mask.any()
    m = build(name, s, t)
    terms = m(s, t, c)
    loss = sum(terms.values())
    assert all(v.ndim == 0 and torch.isfinite(v) for v in terms.values()) and loss > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    if name in ("rm", "pfi", "rmpfi"):  # rank terms and PFI's prediction gap (pfi_detach=false) train the logits
        assert s.scores.grad.abs().sum() > 0
    if name in ("rm", "rmpfi"):  # the IoU rank trains the boxes
        assert s.boxes.grad.abs().sum() > 0
    if name != "rm":  # neck terms train the student's neck (through the adapters)
        assert all(x.grad.abs().sum() > 0 for x in s.neck)
    assert all(x.grad is None for x in [*t.neck, t.scores, t.boxes])
    m2 = copy.deepcopy(m)
    assert all(torch.equal(v, m2(s, t, c)[k]) for k, v in m(s, t, c).items())


def test_rmpfi_is_rm_plus_pfi():
    s, t, c = random_case(16)
    both = build("rmpfi", s, t, rm_weight=2.0, pfi_weight=3.0)
    r, p = build("rm", s, t, rm_weight=2.0), build("pfi", s, t, pfi_weight=3.0)
    p.load_state_dict({k.removeprefix("pfi."): v for k, v in both.state_dict().items()})
    out = both(s, t, c)
    assert set(out) == {"cls", "loc", "pfi"}
    assert torch.equal(out["cls"], r(s, t, c)["cls"]) and torch.equal(out["loc"], r(s, t, c)["loc"])
    assert torch.equal(out["pfi"], p(s, t, c)["loss"])
    assert get_method("rmpfi").uses_args  # no hyper-parameters of its own: rm_* and pfi_*


@pytest.mark.parametrize("name", OURS)
def test_empty_images_and_crowds(name):
    s, t, c = random_case(1, n_gt=(0, 0))  # nothing to assign
    terms = build(name, s, t)(s, t, c)
    assert all(torch.isfinite(v) for v in terms.values())
    if name == "rm":
        assert terms["cls"] == 0 and terms["loc"] == 0
        sum(terms.values()).backward()  # stays in the graph
    s, t, c = random_case(16, n_gt=(130, 5), img=96)
    assert c.assign.fg_mask.sum() > 50
    terms = build(name, s, t)(s, t, c)
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) for v in terms.values())
    grads = [x.grad for x in [*s.neck, s.scores, s.boxes] if x.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", OURS)
def test_fp16_inputs_give_the_fp32_result(name):
    s, t, c = random_case(16)

    def half(f):
        return feats([x.detach().half() for x in f.neck], f.scores.detach().half(), f.boxes.detach().half(),
                     dfl=f.dfl)

    s16, t16 = half(s), half(t)
    m = build(name, s, t)
    out16, out32 = m(s16, t16, c), m(s16.float(), t16.float(), c)
    assert all(v.dtype == torch.float32 and torch.equal(v, out32[k]) for k, v in out16.items())


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def micro_data(tmp_path_factory) -> str:
    """16 train / 8 val synthetic images at 64 px."""
    from yolokd.data.synthetic import SyntheticSpec, make_dataset

    return str(make_dataset(tmp_path_factory.mktemp("micro"), SyntheticSpec(n_train=16, n_val=8, imgsz=64), False))


@pytest.mark.slow
@pytest.mark.parametrize("student", ["yolov8n.yaml", "yolo26n.yaml"])
def test_train_one_epoch_composed(student, micro_data, train_kwargs):
    from ultralytics import YOLO

    from helpers import read_results
    from yolokd import DistillationTrainer

    yolo = YOLO(student)
    # rm_fade=0: in a 1-epoch run the only epoch is the last, where rm's fade (0.5 by default) weighs its terms 0
    yolo.train(trainer=DistillationTrainer, teacher="yolov8s.yaml", method="pdf+rm+pfi", data=micro_data,
               name=f"pred_guided_{student[:-5]}", rm_fade=0, **train_kwargs)
    (row,) = read_results(yolo.trainer.save_dir)
    assert math.isfinite(row["train/kd_loss"]) and row["train/kd_loss"] > 0
    assert all(math.isfinite(row[f"train/{c}"]) for c in ("pdf", "rm_cls", "rm_loc", "pfi"))
    assert row["train/pdf"] > 0 and row["train/pfi"] > 0 and row["train/rm_cls"] > 0
