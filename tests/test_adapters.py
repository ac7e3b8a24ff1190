"""Least-squares initialisation of the 1x1 aligners (`adapter_init=lstsq`): the fit, when it runs, and what it
leaves alone."""

import pytest
import torch

from yolokd.adapters import aligner, fit_aligner
from yolokd.config import DistillationConfigError, kd_defaults
from yolokd.methods.base import MethodSet

from tests.test_methods_pred_guided import random_case


def linear_pair(seed=0, c_s=6, c_t=10):
    """Student maps and teacher maps that are an exact affine function of them: X^t = W X^s + b."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, c_s, 7, 7, generator=g)
    w, b = torch.randn(c_t, c_s, generator=g), torch.randn(c_t, generator=g)
    return s, torch.einsum("oc,bchw->bohw", w, s) + b[None, :, None, None], w, b


def test_exact_affine_map_is_recovered_without_ridge():
    s, t, w, b = linear_pair()
    a = aligner(6, 10)
    fit_aligner(a, s, t, ridge=0.0)
    assert torch.allclose(a.weight[:, :, 0, 0], w, atol=1e-4) and torch.allclose(a.bias, b, atol=1e-4)
    assert torch.allclose(a(s), t, atol=1e-4)


def test_ridge_shrinks_the_weights_and_keeps_the_teacher_mean():
    s, t, _, _ = linear_pair(1)
    loose, tight = aligner(6, 10), aligner(6, 10)
    fit_aligner(loose, s, t, ridge=0.0)
    fit_aligner(tight, s, t, ridge=10.0)
    assert tight.weight.norm() < 0.5 * loose.weight.norm()
    # with centred regression the bias absorbs the means: the mean prediction equals the teacher mean, any ridge
    assert torch.allclose(tight(s).mean((0, 2, 3)), t.mean((0, 2, 3)), atol=1e-4)


def test_ridge_is_relative_to_the_feature_scale():
    s, t, _, _ = linear_pair(2)
    a, b = aligner(6, 10), aligner(6, 10)
    fit_aligner(a, s, t, ridge=1.0)
    fit_aligner(b, 100 * s, t, ridge=1.0)  # same data in other units: the same map, rescaled
    assert torch.allclose(100 * b.weight, a.weight, rtol=1e-4, atol=1e-5)


def test_identity_aligner_is_left_alone():
    s, t, _, _ = linear_pair(c_t=6)
    a = aligner(6, 6)
    fit_aligner(a, s, t)
    assert isinstance(a, torch.nn.Identity)


def method_set(names, init="lstsq", **overrides):
    """Methods with 1x1 projectors, the ones least squares fits (the shipped pdf/fitnet branches are not fitted)."""
    s, t, c = random_case(16)
    args = {**kd_defaults(), "adapter_init": init, "pdf_projector": "conv", "fitnet_projector": "conv", **overrides}
    return MethodSet(names, s, t, type("Args", (), args)), s, t, c


@pytest.mark.parametrize("names, path", [
    (["fitnet"], "fitnet.align.0"),
    (["pdf"], "pdf.align.1"),
    (["dfd"], "dfd.align.2"),
    (["rmpfi"], "rmpfi.pfi.align.0"),  # a method held inside another one is fitted too
])
def test_first_batch_fits_each_aligner_once(names, path):
    ms, s, t, _ = method_set(names)
    conv = ms.methods.get_submodule(path)
    before = conv.weight.detach().clone()
    assert ms.fit_adapters(s, t) is True and bool(ms.adapters_fitted)
    fitted = conv.weight.detach().clone()
    assert not torch.equal(before, fitted)
    level = int(path[-1])
    expected = aligner(*conv.weight.shape[1::-1])
    fit_aligner(expected, s.neck[level], t.neck[level])
    assert torch.allclose(fitted, expected.weight, atol=1e-5)
    s.neck[level] = s.neck[level] + 1.0  # a later batch changes nothing
    assert ms.fit_adapters(s, t) is False and torch.equal(conv.weight, fitted)


def test_pgd_fits_its_head_branch_aligners():
    from yolokd.methods.pgd import PGD  # noqa: F401  (registered)

    s, t, _ = random_case(16)
    s.cls_feat = [x[:, :2] for x in s.neck]
    t.cls_feat = [x[:, :4] for x in t.neck]
    s.box_feat = t.box_feat = [x[:, :3] for x in t.neck]  # same width: identity
    ms = MethodSet(["pgd"], s, t, type("Args", (), {**kd_defaults(), "adapter_init": "lstsq"}))
    ms.fit_adapters(s, t)
    expected = aligner(2, 4)
    fit_aligner(expected, s.cls_feat[0], t.cls_feat[0])
    assert torch.allclose(ms.methods["pgd"].align_cls[0].weight, expected.weight, atol=1e-5)
    assert isinstance(ms.methods["pgd"].align_box[0], torch.nn.Identity)


def test_lstsq_says_when_it_leaves_a_branch_projector_alone(monkeypatch):
    from ultralytics.utils import LOGGER

    said = []
    monkeypatch.setattr(LOGGER, "warning", lambda msg, *a, **k: said.append(msg))
    ms, s, t, _ = method_set(["pdf", "fitnet"], pdf_projector="branch")
    assert ms.fit_adapters(s, t) is True
    assert len(said) == 1 and "pdf.align" in said[0] and "pdf_projector=branch" in said[0]  # fitnet's 1x1: fitted


def test_random_init_never_fits_and_resume_does_not_refit():
    ms, s, t, _ = method_set(["fitnet"], init="random")
    w = ms.methods["fitnet"].align[0].weight.detach().clone()
    assert ms.fit_adapters(s, t) is False and torch.equal(ms.methods["fitnet"].align[0].weight, w)

    fitted, s, t, _ = method_set(["fitnet"])
    fitted.fit_adapters(s, t)
    resumed, *_ = method_set(["fitnet"])
    resumed.load_state_dict(fitted.state_dict())  # what _load_kd_state does with kd_state.pt
    assert resumed.fit_adapters(s, t) is False


def test_unknown_adapter_init_is_refused():
    with pytest.raises(DistillationConfigError, match="adapter_init='ones'.*lstsq, random"):
        method_set(["fitnet"], init="ones")


# ---------------------------------------------------------------- `<method>_projector=branch`
def test_branch_projector_shape_and_layers():
    """The PDF-Distil authors' projection: 3x3 conv + BN + SiLU, then a 1x1 conv; present even at equal widths."""
    for c_s, c_t in [(6, 10), (6, 6)]:
        p = aligner(c_s, c_t, "branch")
        convs = [m for m in p.modules() if isinstance(m, torch.nn.Conv2d)]
        assert [c.kernel_size for c in convs] == [(3, 3), (1, 1)]
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in p.modules())
        assert p(torch.randn(2, c_s, 5, 5)).shape == (2, c_t, 5, 5)  # same grid: the 3x3 conv is padded


def test_branch_projector_is_not_linear_and_not_fitted():
    p = aligner(6, 10, "branch").eval()
    x = torch.randn(1, 6, 4, 4)
    assert not torch.allclose(p(2 * x) - p(torch.zeros_like(x)), 2 * (p(x) - p(torch.zeros_like(x))), atol=1e-4)
    before = [q.detach().clone() for q in p.parameters()]
    s, t, _, _ = linear_pair()
    fit_aligner(p, s, t)  # least squares needs a 1x1 conv: a branch is left as it is
    assert all(torch.equal(a, b) for a, b in zip(before, p.parameters()))


@pytest.mark.parametrize("method", ["fitnet", "pdf"])
def test_projector_option_builds_branches(method):
    s, t, _ = random_case(16)
    args = {**kd_defaults(), f"{method}_projector": "branch"}
    ms = MethodSet([method], s, t, type("Args", (), args))
    assert all(isinstance(a, torch.nn.Sequential) for a in ms.methods[method].align)
    terms = ms.methods[method](s, t, random_case(16)[2])
    (terms["ht"] if method == "fitnet" else terms["loss"]).backward()
    assert all(q.grad is not None for q in ms.methods[method].align.parameters())


def test_unknown_projector_is_refused():
    s, t, _ = random_case(16)
    with pytest.raises(DistillationConfigError, match="pdf_projector='mlp' is not one of: conv, branch"):
        MethodSet(["pdf"], s, t, type("Args", (), {**kd_defaults(), "pdf_projector": "mlp"}))
