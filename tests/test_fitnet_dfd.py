"""FitNet and DFD: hand-computed values, invariances and gradient flow (docs/methods.md#fitnet, #dfd)."""

import math

import pytest
import torch

from yolokd.methods.base import StepContext
from yolokd.methods.dfd import DFD, high_disparity_mask, spatial_attention
from yolokd.methods.fitnet import FitNet
from yolokd.taps import Features

# FitNets' hint stage alone, through a 1x1 regressor (the hand cases' setting; the YAML adds the KD stage)
HINT_ONLY = dict(kd_weight=0.0, hint_share=1.0, projector="conv", pearson=False)


def feats(neck):
    """Features holding only neck maps (what FitNet and DFD read)."""
    b = neck[0].shape[0]
    return Features(neck=neck, scores=torch.zeros(b, 1, 1), boxes=torch.zeros(b, 4, 1),
                    strides=torch.tensor([8.0]), dfl=torch.nn.Identity())


def ctx(h=640, w=640, b=1):
    return StepContext(batch={"img": torch.zeros(b, 3, h, w)}, assign=None)


def test_fitnet_hand_value():
    # student [[1, 2], [3, 4]] against a zero teacher: mean of squares = (1 + 4 + 9 + 16) / 4 = 7.5
    s = feats([torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])])
    t = feats([torch.zeros(1, 1, 2, 2)])
    m = FitNet(s, t, weight=1.0, **HINT_ONLY)
    assert isinstance(m.align[0], torch.nn.Identity)  # same width: no regressor
    assert torch.isclose(m(s, t, ctx())["ht"], torch.tensor(7.5))
    assert torch.isclose(FitNet(s, t, weight=2.0, **HINT_ONLY)(s, t, ctx())["ht"], torch.tensor(15.0))


def test_fitnet_adapter_gets_gradient_teacher_none():
    s = feats([torch.randn(2, 3, 4, 4, requires_grad=True)])
    t = feats([torch.randn(2, 5, 4, 4, requires_grad=True)])
    m = FitNet(s, t, weight=1.0, **HINT_ONLY)
    m(s, feats([t.neck[0].detach()]), ctx())["ht"].backward()  # the loss receives teacher tensors detached
    assert m.align[0].weight.grad.abs().sum() > 0 and s.neck[0].grad.abs().sum() > 0
    assert t.neck[0].grad is None


def test_fitnet_kd_term_hand_value():
    # one class, two anchors. Anchor 0: teacher p = 0.5, student p = 0.75 (logit ln 3):
    # KL(Bern(0.5) || Bern(0.75)) = 0.5 ln(0.5 / 0.75) + 0.5 ln(0.5 / 0.25) = 0.5 ln(4/3); anchor 1: equal, 0.
    # n = max(0.5 + 0.5, 1) = 1, so kd_weight 2 gives ln(4/3). The neck maps are equal: the hint term is 0.
    neck = [torch.ones(1, 1, 1, 2)]
    s = Features(neck=neck, scores=torch.tensor([[[3.0, 1.0]]]).log(), boxes=torch.zeros(1, 4, 2),
                 strides=torch.tensor([8.0]), dfl=torch.nn.Identity())
    t = Features(neck=neck, scores=torch.zeros(1, 1, 2), boxes=torch.zeros(1, 4, 2), strides=torch.tensor([8.0]),
                 dfl=torch.nn.Identity())
    terms = FitNet(s, t, **{**HINT_ONLY, "weight": 1.0, "kd_weight": 2.0})(s, t, ctx())
    assert terms["ht"].item() == 0 and terms["kd"].item() == pytest.approx(math.log(4 / 3), rel=1e-5)
    assert set(FitNet(s, t, weight=1.0, **HINT_ONLY)(s, t, ctx())) == {"ht"}  # the hint alone


def test_fitnet_hint_stage_then_kd_stage():
    # hint_share 0.5 of 4 epochs: the hint acts in epochs 0-1 (stage 1), only the KD term in epochs 2-3 (stage 2)
    g = torch.Generator().manual_seed(0)
    s = Features(neck=[torch.randn(1, 2, 3, 3, generator=g)], scores=torch.randn(1, 2, 9, generator=g),
                 boxes=torch.zeros(1, 4, 9), strides=torch.tensor([8.0]), dfl=torch.nn.Identity())
    t = Features(neck=[torch.randn(1, 2, 3, 3, generator=g)], scores=torch.randn(1, 2, 9, generator=g),
                 boxes=torch.zeros(1, 4, 9), strides=torch.tensor([8.0]), dfl=torch.nn.Identity())
    m = FitNet(s, t, **{**HINT_ONLY, "weight": 1.0, "kd_weight": 1.0, "hint_share": 0.5})
    at = [m(s, t, StepContext(batch={"img": torch.zeros(1, 3, 24, 24)}, assign=None, epoch=e, epochs=4))
          for e in range(4)]
    assert at[0]["ht"] > 0 and torch.equal(at[0]["ht"], at[1]["ht"]) and at[2]["ht"] == at[3]["ht"] == 0
    assert all(torch.equal(a["kd"], at[0]["kd"]) for a in at)  # the KD term is the same in both stages


def test_fitnet_hint_share_must_be_a_share():
    from yolokd.config import DistillationConfigError, check_kd_values

    for ok in (0, 0.5, 1.0):
        check_kd_values({"fitnet_hint_share": ok})
    for bad in (4.0, -0.1):
        with pytest.raises(DistillationConfigError, match=rf"fitnet_hint_share={bad} is out of range: it must be in \[0, 1\]"):
            check_kd_values({"fitnet_hint_share": bad})
    with pytest.raises(DistillationConfigError, match="fitnet_hint_share=nan is out of range"):  # NaN passes no test
        check_kd_values({"fitnet_hint_share": float("nan")})


def test_fitnet_kd_reaches_the_scores_and_the_hint_the_neck_only():
    g = torch.Generator().manual_seed(0)
    s = Features(neck=[torch.randn(2, 3, 4, 4, generator=g).requires_grad_()],
                 scores=torch.randn(2, 2, 16, generator=g).requires_grad_(), boxes=torch.zeros(2, 4, 16),
                 strides=torch.tensor([8.0]), dfl=torch.nn.Identity())
    t = Features(neck=[torch.randn(2, 5, 4, 4, generator=g)], scores=torch.randn(2, 2, 16, generator=g),
                 boxes=torch.zeros(2, 4, 16), strides=torch.tensor([8.0]), dfl=torch.nn.Identity())
    m = FitNet(s, t, **{**HINT_ONLY, "weight": 1.0, "kd_weight": 1.0})
    terms = m(s, t, ctx())
    terms["kd"].backward(retain_graph=True)
    assert s.scores.grad.abs().sum() > 0 and s.neck[0].grad is None and m.align[0].weight.grad is None
    s.scores.grad = None
    terms["ht"].backward()
    assert s.scores.grad is None and s.neck[0].grad.abs().sum() > 0 and m.align[0].weight.grad.abs().sum() > 0


def test_fitnet_kd_term_escapes_the_cap_and_the_hint_does_not():
    from yolokd.config import kd_defaults
    from yolokd.criterion import scale_terms
    from yolokd.methods.base import MethodSet

    from tests.test_methods_pred_guided import random_case

    s, t, c = random_case(16)
    ms = MethodSet(["fitnet", "pfi"], s, t, type("Args", (), {**kd_defaults(), "fitnet_kd_weight": 1.0}))
    terms = ms(s, t, c)
    assert set(terms) == {"fitnet_ht", "fitnet_kd", "pfi"}
    assert {k for k, v in terms.items() if not v.capped} == {"fitnet_kd"}  # FitNet declares it task_scaled
    out, _ = scale_terms(terms, torch.tensor(1e-6), 0.25)
    assert out["fitnet_kd"] is terms["fitnet_kd"].value and out["fitnet_ht"] < terms["fitnet_ht"].value


def test_fitnet_pearson_hand_value():
    # one channel over 4 positions: student [1, 2, 3, 4] -> z = [-3, -1, 1, 3] / sqrt(5); teacher [4, 3, 2, 1] -> -z.
    # The standardised maps differ by 2z, so the loss is mean(4 z^2) = 4 (unit variance), i.e. 2 * (1 - r) at r = -1.
    s = feats([torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])])
    t = feats([torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]])])
    assert torch.isclose(FitNet(s, t, **{**HINT_ONLY, "weight": 1.0, "pearson": True})(s, t, ctx())["ht"], torch.tensor(4.0), atol=1e-5)
    assert torch.isclose(FitNet(s, s, **{**HINT_ONLY, "weight": 1.0, "pearson": True})(s, s, ctx())["ht"], torch.tensor(0.0), atol=1e-5)


def test_fitnet_pearson_ignores_each_channels_scale_and_offset():
    g = torch.Generator().manual_seed(0)
    s = feats([torch.randn(2, 3, 4, 4, generator=g)])
    t = feats([torch.randn(2, 3, 4, 4, generator=g)])
    m = FitNet(s, t, **{**HINT_ONLY, "weight": 1.0, "pearson": True})
    scale, shift = torch.tensor([0.5, 1.0, 50.0]).view(1, 3, 1, 1), torch.tensor([3.0, -2.0, 0.5]).view(1, 3, 1, 1)
    t2 = feats([t.neck[0] * scale + shift])
    assert torch.isclose(m(s, t, ctx())["ht"], m(s, t2, ctx())["ht"], rtol=1e-4)
    plain = FitNet(s, t, weight=1.0, **HINT_ONLY)
    assert not torch.isclose(plain(s, t, ctx())["ht"], plain(s, t2, ctx())["ht"])  # the MSE is not blind to it


def test_spatial_attention_sums_to_hw():
    a = spatial_attention(torch.randn(3, 8, 5, 7))
    assert a.shape == (3, 5, 7)
    assert torch.allclose(a.sum(dim=(1, 2)), torch.full((3,), 35.0))
    # Eq. 2 by hand on a 1x2 map: mean_c |F| = [1, 3] -> 2 * softmax([1, 3])
    f = torch.tensor([[[[1.0, 2.0]], [[-1.0, 4.0]]]])  # C=2, H=1, W=2
    assert torch.allclose(spatial_attention(f).flatten(), 2 * torch.tensor([1.0, 3.0]).softmax(0))


def test_mask_equals_injected_disparity_region():
    torch.manual_seed(0)
    t = torch.ones(1, 4, 8, 8)
    s = t.clone()
    s[..., 2:4, 5:7] = 6.0  # a strong response only in the student, in a known 2x2 region
    mask = high_disparity_mask(t, s)[0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 5:7] = True
    assert torch.equal(mask, expected)


def make_dfd(c_s=4, c_t=4, hidden_cap=0, alpha=2.8e-5, beta=1e-5):
    s = feats([torch.zeros(1, c_s, 8, 8)])
    t = feats([torch.zeros(1, c_t, 8, 8)])
    return DFD(s, t, alpha=alpha, beta=beta, ref_area=640 * 640, hidden_cap=hidden_cap)


def test_dfd_zero_when_features_equal():
    m = make_dfd()
    f = torch.randn(2, 4, 8, 8)
    out = m(feats([f]), feats([f]), ctx(b=2))
    assert out["hd"] == 0 and out["ld"] == 0  # D == 0 everywhere: all LD (strict D > P), and LD is plain MSE = 0


def test_dfd_hand_value_low_disparity_region():
    # Uniform attention difference 0 (both constant maps) -> every position LD; L_LD = sum (F^T - F^S)^2.
    m = make_dfd(alpha=0.0, beta=1.0)
    s, t = torch.full((1, 4, 8, 8), 1.0), torch.full((1, 4, 8, 8), 3.0)
    out = m(feats([s]), feats([t]), ctx(640, 640))
    assert torch.isclose(out["ld"], torch.tensor(4.0 * 4 * 8 * 8))  # (3-1)^2 * C*H*W, scale 1 at 640x640
    # Size invariance: the same maps from a 320x320 input count 4x (ref_area / area).
    out = m(feats([s]), feats([t]), ctx(320, 320))
    assert torch.isclose(out["ld"], torch.tensor(4.0 * 4 * 8 * 8 * 4))
    # Batch mean: two identical images give the same loss as one.
    out2 = m(feats([s.repeat(2, 1, 1, 1)]), feats([t.repeat(2, 1, 1, 1)]), ctx(320, 320, b=2))
    assert torch.isclose(out2["ld"], out["ld"])


def test_dfd_gradients_flow_only_where_they_should():
    torch.manual_seed(0)
    m = make_dfd(c_s=3, c_t=4, hidden_cap=8)
    fs = torch.randn(1, 3, 8, 8, requires_grad=True)
    ft = torch.randn(1, 4, 8, 8)
    ft[..., 0:2, 0:2] += 8.0  # a strong teacher-only region -> high disparity there
    s, t = feats([fs]), feats([ft])

    out = m(s, t, ctx())
    assert m.transform[0][-1].out_channels == 4  # f maps the student width (3) to the teacher's (4)
    # L_LD does not reach the transformation module f.
    grads = torch.autograd.grad(out["ld"], list(m.transform.parameters()), allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)
    # L_HD reaches the student feature only inside the HD region dilated by 1 px (the 3x3 conv of f).
    hd = high_disparity_mask(ft, m.align[0](fs))[0]
    (g,) = torch.autograd.grad(out["hd"], fs, retain_graph=True)
    dilated = torch.nn.functional.max_pool2d(hd[None, None].float(), 3, stride=1, padding=1)[0, 0].bool()
    assert hd.any() and (~hd).any()
    assert g.abs().sum(1)[0][~dilated].abs().max() == 0
    assert g.abs().sum() > 0
    # Both terms train the 1x1 aligner; nothing reaches the teacher (it is not a leaf requiring grad).
    (out["hd"] + out["ld"]).backward()  # fs.grad now also holds the LD part
    assert m.align[0].weight.grad.abs().sum() > 0 and fs.grad.abs().sum() > 0


@pytest.mark.parametrize("cap,expected", [(0, 8), (6, 6)])
def test_dfd_transformation_width(cap, expected):
    m = make_dfd(c_s=4, c_t=4, hidden_cap=cap)
    assert m.transform[0][0].out_channels == expected  # Tab. 5: 2C, optionally capped


def terms_of(capped: dict, task_scaled: dict | None = None) -> dict:
    from yolokd.methods.base import Term

    return {**{k: Term(v) for k, v in capped.items()}, **{k: Term(v, capped=False) for k, v in (task_scaled or {}).items()}}


def test_kd_max_ratio_caps_but_never_boosts():
    from yolokd.criterion import scale_terms

    a, b = torch.tensor(3.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    capped, scale = scale_terms(terms_of({"a": a, "b": b}), task=torch.tensor(8.0), max_ratio=0.25)  # cap 2, kd 4
    assert torch.isclose(capped["a"], torch.tensor(1.5)) and torch.isclose(capped["b"], torch.tensor(0.5))
    capped["a"].backward()
    assert torch.isclose(a.grad, torch.tensor(0.5))  # the factor is a constant: gradients scale, directions stay
    same, unbound = scale_terms(terms_of({"a": a, "b": b}), task=torch.tensor(8.0), max_ratio=1.0)  # kd 4 <= 8
    assert torch.equal(same["a"], a) and torch.equal(same["b"], b)
    assert scale == 0.5 and unbound == 1  # the scale factor the criterion logs as kd_scale
    assert torch.equal(scale_terms(terms_of({"a": a}), task=torch.tensor(0.1), max_ratio=0.0)[0]["a"], a)  # 0 = off


def test_kd_max_ratio_leaves_task_scaled_terms_alone():
    from yolokd.criterion import scale_terms

    terms = terms_of({"dfd_hd": torch.tensor(3.0), "dfd_ld": torch.tensor(1.0)}, {"ld_cls": torch.tensor(5.0)})
    out, _ = scale_terms(terms, task=torch.tensor(8.0), max_ratio=0.25)
    assert out["ld_cls"] is terms["ld_cls"].value  # not counted, not scaled
    assert out["dfd_hd"].item() == pytest.approx(1.5) and out["dfd_ld"].item() == pytest.approx(0.5)  # 4 -> 2
    assert scale_terms(terms_of({}, {"ld_cls": torch.tensor(50.0)}), torch.tensor(1.0), 0.25)[0]["ld_cls"] == 50


def test_kd_ramp_and_fade_schedule():
    from yolokd.criterion import schedule_factor

    # 8 epochs, fade over the last half: full weight for epochs 1-4, then 3/4, 1/2, 1/4, 0 (hand-computed)
    assert [schedule_factor(e, 8, 0.0, 0.5) for e in range(8)] == [1, 1, 1, 1, 0.75, 0.5, 0.25, 0]
    assert [schedule_factor(e, 4, 0.0, 1.0) for e in range(4)] == [0.75, 0.5, 0.25, 0]  # fade over all of training
    assert all(schedule_factor(e, 8, 0.0, 0.0) == 1 for e in range(8))  # 0 = constant (the papers')
    # ramp over the first half: 1/4, 2/4, 3/4, then full weight; never 0, so the adapters train from the start
    assert [schedule_factor(e, 8, 0.5, 0.0) for e in range(8)] == [0.25, 0.5, 0.75, 1, 1, 1, 1, 1]
    assert [schedule_factor(e, 8, 0.5, 0.5) for e in range(8)] == [0.25, 0.5, 0.75, 1, 0.75, 0.5, 0.25, 0]
    assert schedule_factor(0, 3, 1.0, 0.0) == pytest.approx(1 / 3)


def kd_loss_by_epoch(method: str, epochs: tuple[int, ...], of: int, **overrides) -> dict[int, float]:
    """`kd_loss` of one step of a random yolov8n student (yolov8n teacher, cap off) on one batch, as the criterion
    computes it at each 0-based epoch in `epochs` of `of`, with the train arguments' defaults and `overrides`, as a
    float (pytest 9.2's `approx` iterates over what it compares with, which a 0-d tensor refuses)."""
    from types import SimpleNamespace

    from helpers import student_step
    from yolokd.config import kd_defaults

    args = SimpleNamespace(**{**kd_defaults(), "method": method, "kd_max_ratio": 0.0, **overrides})
    *_, model, _, _, crit = student_step("yolov8n.yaml", ["a", "b", "c"], args, "yolov8n.yaml")
    torch.manual_seed(1)
    img = torch.rand(2, 3, 64, 64)
    batch = {"img": img, "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [2.0]]),
             "bboxes": torch.tensor([[0.3, 0.3, 0.4, 0.3], [0.5, 0.5, 0.6, 0.6]])}
    kd = {}
    for epoch in epochs:
        crit.trainer = SimpleNamespace(epoch=epoch, epochs=of)
        kd[epoch] = float(crit(model(img), batch)[1]["kd_loss"])
    return kd


def test_kd_ramp_reaches_the_criterion_by_the_trainers_epoch():
    """kd_ramp=0.5 over 8 epochs: the capped terms weigh 1/4 in the first epoch and fully from the fourth."""
    kd = kd_loss_by_epoch("dfd", (0, 3), 8, kd_ramp=0.5)
    assert kd[3] > 0 and kd[0] == pytest.approx(kd[3] / 4, rel=1e-5)


def test_kd_fade_scales_capped_terms_only():
    from yolokd.criterion import scale_terms

    terms = terms_of({"dfd_hd": torch.tensor(3.0), "dfd_ld": torch.tensor(1.0)}, {"ld_cls": torch.tensor(5.0)})
    out, _ = scale_terms(terms, task=torch.tensor(8.0), max_ratio=0.25, schedule=lambda fade: 0.5)
    assert out["ld_cls"] is terms["ld_cls"].value  # task-scaled terms are never faded
    assert out["dfd_hd"].item() == pytest.approx(0.75) and out["dfd_ld"].item() == pytest.approx(0.25)  # cap, then x 0.5
    no_cap, _ = scale_terms(terms_of({"a": torch.tensor(2.0)}), task=torch.tensor(1.0), max_ratio=0.0,
                            schedule=lambda fade: 0.25)
    assert no_cap["a"].item() == pytest.approx(0.5)  # the fade acts without the cap too


def test_each_term_fades_by_its_own_methods_fade():
    """rmpfi (fade 0.5) beside dfd (no fade) at epoch 7 of 8: the cap is set by the sum of both, then only rmpfi's
    term is lowered, by schedule_factor(6, 8, 0, 0.5) = 1/4 (hand-computed: 8 epochs, fade over the last 4)."""
    from functools import partial

    from yolokd.criterion import scale_terms, schedule_factor
    from yolokd.methods.base import Term

    terms = {"rmpfi_pfi": Term(torch.tensor(3.0), fade=0.5), "dfd_hd": Term(torch.tensor(1.0), fade=0.0),
             "ld_cls": Term(torch.tensor(5.0), capped=False, fade=0.5)}
    out, scale = scale_terms(terms, task=torch.tensor(8.0), max_ratio=0.25, schedule=partial(schedule_factor, 6, 8, 0.0))
    assert scale.item() == pytest.approx(0.5)  # cap 2 over a sum of 4, before any fade
    assert out["rmpfi_pfi"].item() == pytest.approx(3.0 * 0.5 * 0.25) and out["dfd_hd"].item() == pytest.approx(0.5)
    assert out["ld_cls"].item() == 5.0  # never faded, whatever its method's fade


@pytest.mark.parametrize("args,expected", [
    ({}, {"rm": 0.5, "rmpfi": 0.5, "dfd": 0.0, "pfi": 0.0, "ld": 0.0}),  # the YAMLs': rm's and rmpfi's own fade
    ({"kd_fade": None}, {"rm": 0.5, "rmpfi": 0.5, "dfd": 0.0}),  # left empty: the same
    ({"kd_fade": 0.33}, {"rm": 0.33, "rmpfi": 0.33, "dfd": 0.33}),  # given: every method of the run
    ({"kd_fade": 0}, {"rm": 0.0, "rmpfi": 0.0, "dfd": 0.0}),  # 0 turns their own off too
    ({"rmpfi_fade": 0.2}, {"rm": 0.5, "rmpfi": 0.2, "dfd": 0.0}),  # one method's own: rmpfi's is not rm's
    ({"rm_fade": 0.0}, {"rm": 0.0, "rmpfi": 0.5}),  # nor rm's rmpfi's, though rmpfi reads the other rm_* keys
])
def test_method_fade_is_kd_fade_or_the_methods_own(args, expected):
    from yolokd.config import method_fade

    assert {m: method_fade(m, args) for m in expected} == expected


@pytest.mark.parametrize("method", ["rm", "rmpfi"])
@pytest.mark.parametrize("overrides,ratio", [({}, 0.25), ({"own_fade": 0.0}, 1.0), ({"kd_fade": 0.0}, 1.0),
                                             ({"kd_fade": 0.25}, 0.5)])
def test_rm_and_rmpfi_fade_by_default_through_the_criterion(method, overrides, ratio):
    """method=rm or rmpfi with the train arguments' defaults: its kd_loss at epoch 7 of 8 is 1/4 of epoch 1's (fade
    0.5: factor (8 - 1 - 6) / 4); with its own fade off, equal; with kd_fade=0.25, (8 - 1 - 6) / 2 = 1/2."""
    overrides = {k.replace("own", method): v for k, v in overrides.items()}
    kd = kd_loss_by_epoch(method, (0, 6), 8, **overrides)
    assert kd[0] > 0 and kd[6] == pytest.approx(kd[0] * ratio, rel=1e-5)


def test_task_scaled_terms_are_ld_only():
    from yolokd.config import kd_defaults
    from yolokd.methods.base import MethodSet

    from tests.test_methods_pred_guided import random_case

    s, t, c = random_case(16)
    ms = MethodSet(["pfi", "ld"], s, t, type("Args", (), kd_defaults()))
    terms = ms(s, t, c)
    assert {k for k, v in terms.items() if not v.capped} == {"ld_cls", "ld_box"} and terms["pfi"].capped


@pytest.mark.parametrize("epochs,said", [
    (30, ("info", "rmpfi's terms fade linearly to 0 from epoch 16 of 30")),  # (29 - 15) / 15 < 1 from index 15
    (1, ("warning", "rmpfi's terms fade linearly to 0 from epoch 1 of 1")),  # one epoch: at 0 throughout
])
def test_the_trainer_says_when_a_methods_fade_begins(epochs, said, monkeypatch):
    from types import SimpleNamespace

    from ultralytics.utils import LOGGER

    from yolokd.trainer import DistillationTrainer

    logs = []
    for level in ("info", "warning"):
        monkeypatch.setattr(LOGGER, level, lambda msg, *a, level=level, **k: logs.append((level, msg)))
    run = SimpleNamespace(epochs=epochs, kd_methods=SimpleNamespace(fades={"rmpfi": 0.5, "ld": 0.5, "dfd": 0.0}))
    DistillationTrainer._log_fades(run)
    assert len(logs) == 1 and logs[0][0] == said[0] and said[1] in logs[0][1]  # ld is never faded, dfd has no fade
