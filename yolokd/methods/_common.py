"""Helpers shared by the prediction-guided neck imitations (PDF-Distil, PFI), Rank Mimicking and the soft-target
class term of `ld` and `fitnet`.

PDF-Distil and PFI have the same shape: a per-position weight map w_l computed from the two models' class
predictions, times the channel-mean squared gap between the teacher's neck feature and the 1x1-adapted student's,
averaged over positions and images, then over levels. Only the weight map differs, so the gap and the split of
the flat (B, nc, A) score tensor into levels live here once.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from yolokd.taps import Features


def prepare(s: Features, t: Features | None) -> tuple[Features, Features | None]:
    """Student features in fp32; teacher features in fp32 and detached, whatever the caller passed.

    The criterion already hands both in fp32 with the teacher detached; this keeps a method correct when it is
    called directly (tests, notebooks) with fp16 or grad-carrying tensors.
    """
    if s.scores.dtype != torch.float32:
        s = s.float()
    if t is None:
        return s, None
    t = t.float()
    return s, dataclasses.replace(
        t,
        neck=[x.detach() for x in t.neck],
        scores=t.scores.detach(),
        boxes=t.boxes.detach(),
        cls_feat=[x.detach() for x in t.cls_feat],
        box_feat=[x.detach() for x in t.box_feat],
    )


def split_levels(x: torch.Tensor, neck: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split the anchor axis (last) of `x` (..., A) into levels (..., H_l*W_l), in the neck's P3..P5 order.

    Ultralytics flattens each level's (H, W) grid row-major and concatenates the levels, so this is a plain split.
    """
    return list(x.split([f.shape[-2] * f.shape[-1] for f in neck], dim=-1))


def feature_gaps(align: nn.ModuleList, s_neck: list[torch.Tensor], t_neck: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per level, the channel-mean squared gap mean_c (X^t - Adapt(X^s))^2, flattened to (B, H_l*W_l)."""
    return [(xt - a(xs)).pow(2).mean(1).flatten(1) for a, xs, xt in zip(align, s_neck, t_neck)]


def level_mean(maps: list[torch.Tensor]) -> torch.Tensor:
    """mean_l mean_{b, hw} of per-level maps (B, H_l*W_l): every level counts the same, whatever its size."""
    return torch.stack([m.mean() for m in maps]).mean()


def binary_kl(z_t: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(Bern(sigma(z_t)) || Bern(sigma(z_s))) from logits, in log space (no log(0)).

    A sigmoid head's nc outputs are independent Bernoullis, so this, not a softmax KL, compares two of them."""
    p_t = z_t.sigmoid()
    return p_t * (F.logsigmoid(z_t) - F.logsigmoid(z_s)) + (1 - p_t) * (F.logsigmoid(-z_t) - F.logsigmoid(-z_s))


def soft_class_kd(z_t: torch.Tensor, z_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft-target knowledge distillation (Hinton et al., 2015, arXiv:1503.02531) for a dense sigmoid head.

    Scores (B, nc, A) as logits. Returns (loss, w, n): loss = sum_{b,c,a} KL(Bern(p_t) || Bern(p_s)) / n, with
    w_{b,a} = max_c p_t the teacher's confidence (detached) and n = max(sum w, 1), the soft analogue of
    Ultralytics' `target_scores_sum`, so the loss has the scale of the task's BCE cls loss (its gradient w.r.t.
    z_s is (p_s - p_t) / n, the BCE's with the teacher's probabilities as targets)."""
    with torch.no_grad():
        w = z_t.sigmoid().amax(1)
        n = w.sum().clamp_min(1.0)
    return binary_kl(z_t, z_s).sum() / n, w, n
