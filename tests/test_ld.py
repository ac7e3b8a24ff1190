"""Dense prediction KD (`ld`): hand-computed class and box terms, invariances, gradient flow, both head kinds."""

import math

import pytest
import torch

from yolokd.methods._common import binary_kl
from yolokd.methods.ld import DensePredictionKD, edge_kl
from yolokd.taps import Features

from tests.test_methods_pred_guided import ctx, feats, logit, random_case


def ld(cls_weight=1.0, box_weight=1.0, temperature=1.0):
    return DensePredictionKD(None, None, cls_weight=cls_weight, box_weight=box_weight, temperature=temperature,
                             assign="student")


def one_image(p_s, p_t, boxes_s, boxes_t):
    """One image, nc = 1, A = 2 anchors on a single 1x2 level, reg_max = 1 (raw ltrb distances)."""
    neck = [torch.zeros(1, 1, 1, 2)]
    s = feats(neck, logit(*p_s).view(1, 1, 2).requires_grad_(), torch.tensor(boxes_s).T[None].requires_grad_(),
              strides=(8.0,))
    t = feats(neck, logit(*p_t).view(1, 1, 2), torch.tensor(boxes_t).T[None], strides=(8.0,))
    return s, t


def bern_kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_hand_computed_reg_max_1():
    # teacher p = (0.5, 0.2), student (0.25, 0.2): N = max(0.5 + 0.2, 1) = 1
    s, t = one_image((0.25, 0.2), (0.5, 0.2), [[0.0, 1, 1, 3], [2, 2, 2, 2]], [[1.0, 1, 1, 1], [2, 2, 2, 2]])
    out = ld(cls_weight=2.0, box_weight=3.0)(s, t, ctx())
    assert out["cls"].item() == pytest.approx(2.0 * bern_kl(0.5, 0.25), rel=1e-5)  # 0.5 ln(4/3) per unit weight
    # box: anchor 0 mean |d_t - d_s| = (1 + 0 + 0 + 2) / 4 = 0.75, weighted by the teacher's confidence 0.5
    assert out["box"].item() == pytest.approx(3.0 * 0.5 * 0.75, rel=1e-5)


def test_normalised_by_teacher_confidence_when_above_one():
    # teacher p = (0.9, 0.6): N = 1.5
    s, t = one_image((0.3, 0.6), (0.9, 0.6), [[0.0, 0, 0, 0]] * 2, [[1.0, 1, 1, 1]] * 2)
    out = ld()(s, t, ctx())
    assert out["cls"].item() == pytest.approx(bern_kl(0.9, 0.3) / 1.5, rel=1e-5)
    assert out["box"].item() == pytest.approx((0.9 * 1 + 0.6 * 1) / 1.5, rel=1e-5)


def test_edge_kl_hand_computed_with_temperature():
    # one edge, two bins: teacher logits (0, 0), student (2 ln 3, 0); at tau = 2 the student is (3/4, 1/4)
    d_t = torch.zeros(1, 4, 2, 1)
    d_s = torch.zeros(1, 4, 2, 1)
    d_s[0, 0, 0, 0] = 2 * math.log(3)
    kl = edge_kl(d_t, d_s, tau=2.0)
    expected = 4 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert kl[0, 0, 0].item() == pytest.approx(expected, rel=1e-5)
    assert kl[0, 1:].abs().max() < 1e-7


def test_class_gradient_is_bce_with_teacher_targets():
    s, t = one_image((0.25, 0.7), (0.5, 0.2), [[1.0, 1, 1, 1]] * 2, [[1.0, 1, 1, 1]] * 2)
    ld()(s, t, ctx())["cls"].backward()
    expected = (torch.tensor([0.25, 0.7]) - torch.tensor([0.5, 0.2])) / 1.0  # (p_s - p_t) / N, N = max(0.7, 1)
    assert torch.allclose(s.scores.grad.flatten(), expected, atol=1e-6)


@pytest.mark.parametrize("reg_max", [16, 1])
def test_zero_when_student_equals_teacher_and_gradients_flow_only_to_head_outputs(reg_max):
    s, t, c = random_case(reg_max)
    same = Features(neck=s.neck, scores=t.scores.clone().requires_grad_(), boxes=t.boxes.clone().requires_grad_(),
                    strides=s.strides, dfl=s.dfl)
    out = ld()(same, t, c)
    assert out["cls"].abs().item() < 1e-6 and out["box"].abs().item() < 1e-6
    out = ld()(s, t, c)
    assert all(torch.isfinite(v) and v > 0 for v in out.values())
    out["cls"].backward(retain_graph=True)
    assert s.scores.grad.abs().sum() > 0 and s.boxes.grad is None  # the class term trains the logits only
    s.scores.grad = None
    out["box"].backward()
    assert s.scores.grad is None and s.boxes.grad.abs().sum() > 0  # the box term trains the box outputs only
    assert all(x.grad is None for x in s.neck)


def test_batch_of_copies_gives_the_same_loss():
    s, t, c = random_case(16, n_gt=(3,))
    one = ld()(s, t, c)
    cat = lambda f: Features(neck=[torch.cat([x, x]) for x in f.neck], scores=torch.cat([f.scores] * 2),  # noqa: E731
                             boxes=torch.cat([f.boxes] * 2), strides=f.strides, dfl=f.dfl)
    two = ld()(cat(s), cat(t), c)
    assert all(torch.allclose(one[k], two[k], rtol=1e-5) for k in one)


def test_binary_kl_is_finite_for_saturated_logits():
    z = torch.tensor([-80.0, 0.0, 80.0])
    assert torch.isfinite(binary_kl(z, z.flip(0))).all() and binary_kl(z, z).abs().max() < 1e-6


def test_mixed_heads_compare_decoded_distances():
    """A v8 teacher (reg_max 16) with a YOLO26 student (reg_max 1): L1 between the decoded distances."""
    s1, _, c = random_case(1)
    _, t16, _ = random_case(16)
    out = ld()(s1, t16, c)
    w = t16.scores.sigmoid().amax(1)
    expected = ((t16.dfl(t16.boxes) - s1.boxes).abs().mean(1) * w).sum() / w.sum().clamp_min(1)
    assert out["box"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_ld_is_the_default_method_with_a_teacher():
    from yolokd.trainer import resolve_method_names

    assert resolve_method_names(None, "teacher.pt") == ["ld"]
    assert resolve_method_names("", None) == []  # no teacher, no method: plain training
    assert resolve_method_names("dfd+ld", "teacher.pt") == ["dfd", "ld"]
