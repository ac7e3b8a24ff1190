"""Prediction-Guided Weighting (PGW) of PGD (Yang et al., ECCV 2022, Sec. 3.1-3.2): the teacher-only masks.

For every ground-truth box g and anchor a of the teacher (all pyramid levels together, A anchors):
- quality q(a, g) = 1[centre_a strictly inside g] * sigmoid(z^T_{a, c_g})^(1 - xi) * IoU(b^T_a, g)^xi   (Eq. 1)
- T^g = the k = min(K, #{q > 0}) anchors of highest q;                                                   (Sec. 3.2)
- mu, Sigma = MLE mean and covariance of the anchor centres (pixels) in T^g, Sigma += 1 px^2 * Id           (Eq. 2)
- I^g(a) = exp(-1/2 (X_a - mu)^T Sigma^-1 (X_a - mu)) for a in T^g, 0 elsewhere;  I = max_g I^g            (Eq. 3)
- per image and level, M = I / #{I != 0} (Eq. 4) and N = bg / #bg with bg = "centre inside no box" (Eq. 5), with
  the same in-box test as Eq. 1 (small boxes enlarged, see below).

Choices (see docs/methods.md#pgd and the `pgd` module docstring for the loss side):
- the in-box indicator is applied *before* the top-K, as the paper writes it. The authors' code takes the top-K over
  every anchor and multiplies by the indicator afterwards, and its anchor-free in-box test reads the points as (y, x)
  while they are (x, y); neither is replicated.
- the in-box test is Ultralytics' own (`TaskAlignedAssigner.select_candidates_in_gts`): a box side shorter than the
  middle stride (16 px on P3-P5) is enlarged to it about the box centre first, so a small object (about 4 % of them
  on `data=synthetic` at 160 px fell between anchor centres) still gets key regions, on the anchors the assigner
  could make positive for it.
- the authors break the singular covariance of collinear points with U(+-0.05 px) noise on the points; a
  deterministic 1 px^2 floor on the diagonal does the same job (det Sigma >= 1) and keeps masks reproducible.
- everything is batched over the padded (B, n_max, A) ground-truth layout: no Python loop over boxes or images;
  IoU and scores are only evaluated on in-box (image, box, anchor) triples, so memory follows the in-box count.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ultralytics.utils.metrics import bbox_iou
from ultralytics.utils.tal import TaskAlignedAssigner

COV_FLOOR = 1.0  # px^2 added to the diagonal of every fitted covariance


class GroundTruth(NamedTuple):
    """Padded ground truth of a batch: `labels` (B, n) long, `boxes` (B, n, 4) xyxy pixels, `valid` (B, n) bool."""

    labels: torch.Tensor
    boxes: torch.Tensor
    valid: torch.Tensor


def ground_truth(assign, batch: dict) -> GroundTruth:
    """Padded ground truth from the student's assignment (as Ultralytics' loss built it), else from the raw batch.

    Args:
        assign (Assignment | None): the captured assigner inputs/outputs of this step.
        batch (dict): the Ultralytics batch (`img`, `batch_idx`, `cls`, normalised xywh `bboxes`).
    """
    if assign is not None:
        valid = assign.mask_gt.squeeze(-1) > 0
        return GroundTruth(assign.gt_labels.squeeze(-1).long(), assign.gt_bboxes.float(), valid)
    img = batch["img"]
    b, (h, w) = img.shape[0], img.shape[-2:]
    idx = batch["batch_idx"].long().view(-1).to(img.device)
    n = int(torch.bincount(idx, minlength=b).max()) if idx.numel() else 0
    order = torch.argsort(idx, stable=True)
    idx = idx[order]
    first = torch.searchsorted(idx, idx)  # position of each image's first box in the sorted list
    slot = torch.arange(idx.numel(), device=img.device) - first
    xywh = batch["bboxes"].float().to(img.device)[order] * torch.tensor([w, h, w, h], device=img.device)
    boxes = torch.zeros(b, n, 4, device=img.device)
    labels = torch.zeros(b, n, dtype=torch.long, device=img.device)
    valid = torch.zeros(b, n, dtype=torch.bool, device=img.device)
    boxes[idx, slot] = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    labels[idx, slot] = batch["cls"].view(-1).long().to(img.device)[order]
    valid[idx, slot] = True
    return GroundTruth(labels, boxes, valid)


@functools.lru_cache(maxsize=None)
def _assigner(strides: tuple[float, ...]) -> TaskAlignedAssigner:
    return TaskAlignedAssigner(stride=list(strides))


def inside_boxes(centres: torch.Tensor, gt: GroundTruth, strides: tuple[float, ...] = (8.0, 16.0, 32.0)) -> torch.Tensor:
    """(B, n, A) bool: anchor centre (A, 2) px, (x, y), strictly inside a valid box (Eq. 1 indicator), with the
    sides of small boxes enlarged to the assigner's minimum about their centre (see the module docstring)."""
    inside = _assigner(tuple(strides)).select_candidates_in_gts(centres, gt.boxes, gt.valid[..., None])
    return inside & gt.valid[..., None]


def teacher_quality(
    logits: torch.Tensor, boxes: torch.Tensor, gt: GroundTruth, inside: torch.Tensor, xis: tuple[float, ...]
) -> list[torch.Tensor]:
    """Eq. 1 for each exponent in `xis`: (B, n, A) quality, zero outside the boxes.

    Args:
        logits (torch.Tensor): teacher class logits (B, nc, A).
        boxes (torch.Tensor): teacher decoded boxes (B, A, 4), xyxy pixels.
        gt (GroundTruth): the padded ground truth.
        inside (torch.Tensor): `inside_boxes` (B, n, A).
        xis (tuple[float, ...]): IoU exponents (e.g. xi_cls, xi_reg).
    """
    b, g, a = inside.nonzero(as_tuple=True)
    p = logits.float()[b, gt.labels[b, g], a].sigmoid()
    iou = bbox_iou(gt.boxes[b, g].float(), boxes.float()[b, a], xywh=False).view(-1).clamp_(0, 1)
    out = []
    for xi in xis:
        q = inside.new_zeros(inside.shape, dtype=torch.float)
        q[b, g, a] = p.pow(1 - xi) * iou.pow(xi)
        out.append(q)
    return out


def fit_gaussian(points: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2, MLE of a 2-D Gaussian on the points with weight 1 (0 = padding), plus the `COV_FLOOR` diagonal.

    Args:
        points (torch.Tensor): (..., K, 2) pixel coordinates.
        weight (torch.Tensor): (..., K) 1 for a selected point, 0 for padding.

    Returns:
        mu (..., 2) and Sigma (..., 2, 2). A set with no point gives mu = 0, Sigma = COV_FLOOR * Id.
    """
    cnt = weight.sum(-1).clamp(min=1)[..., None]
    mu = (weight[..., None] * points).sum(-2) / cnt
    d = points - mu[..., None, :]
    cov = torch.einsum("...k,...ki,...kj->...ij", weight, d, d) / cnt[..., None]
    return mu, cov + COV_FLOOR * torch.eye(2, device=points.device, dtype=points.dtype)


def gaussian_weight(points: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Eq. 3: exp(-1/2 (X - mu)^T Sigma^-1 (X - mu)) for points (..., K, 2), with a 2x2 closed-form inverse."""
    d = points - mu[..., None, :]
    a, b, c, e = (cov[..., i, j, None] for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    maha = (e * d[..., 0] ** 2 - (b + c) * d[..., 0] * d[..., 1] + a * d[..., 1] ** 2) / (a * e - b * c)
    return torch.exp(-0.5 * maha)


def key_region_importance(q: torch.Tensor, centres: torch.Tensor, topk: int) -> torch.Tensor:
    """Eq. 2-3 and the max over boxes: (B, A) importance I from the quality q (B, n, A) and centres (A, 2) px."""
    bsz, n, a = q.shape
    vals, idx = q.topk(min(topk, a), dim=-1)  # (B, n, k)
    sel = (vals > 0).float()  # k = min(K, #q > 0): zero-quality picks are padding
    pts = centres[idx]  # (B, n, k, 2)
    mu, cov = fit_gaussian(pts, sel)
    w = gaussian_weight(pts, mu, cov) * sel
    return q.new_zeros(bsz, a).scatter_reduce_(1, idx.view(bsz, -1), w.view(bsz, -1), "amax")


def level_index(sizes: list[int], device=None) -> torch.Tensor:
    """(A,) long: the pyramid level of each anchor, from the per-level anchor counts H_l * W_l."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))


def normalise_per_level(m: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Eq. 4: m (B, A) divided by its number of non-zero entries in the same image and level (0 stays 0)."""
    counts = m.new_zeros(m.shape[0], int(levels.max()) + 1).index_add_(1, levels, (m != 0).to(m.dtype))
    return m / counts[:, levels].clamp(min=1)


@torch.no_grad()
def pgw_masks(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    centres: torch.Tensor,
    gt: GroundTruth,
    xis: tuple[float, ...],
    topk: int,
    strides: tuple[float, ...] = (8.0, 16.0, 32.0),
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Teacher-only PGW masks.

    Args:
        logits (torch.Tensor): teacher class logits (B, nc, A).
        boxes (torch.Tensor): teacher decoded boxes (B, A, 4), xyxy pixels.
        centres (torch.Tensor): anchor centres (A, 2), (x, y) pixels.
        gt (GroundTruth): padded ground truth.
        xis (tuple[float, ...]): one IoU exponent per wanted mask.
        topk (int): K.
        strides (tuple[float, ...]): the model's strides, for the in-box test's minimum box side.

    Returns:
        ([I_xi (B, A) raw importance for each xi], background (B, A) bool).
    """
    inside = inside_boxes(centres.float(), gt, strides)
    qualities = teacher_quality(logits, boxes, gt, inside, xis)
    importance = [key_region_importance(q, centres.float(), topk) for q in qualities]
    return importance, ~inside.any(1)
