"""Prediction-Guided Distillation, PGD (Yang et al., ECCV 2022), on the first block of YOLO's two head branches.

Features F: output of `cv3[l][0]` (cls branch; YOLO11/26: its DWConv+Conv Sequential) and `cv2[l][0]` (box branch),
l = P3..P5. The student's are mapped to the teacher's width by a 1x1 conv where widths differ (identity otherwise);
every attention and loss below uses these adapted student features. Masks M^cls, M^reg, N come from the teacher
alone (`pgd_masks`, Eq. 1-4), with xi_cls = 0.8 and xi_reg = 0.6.

Attentions (Eq. 7, FGD-style), tau = 0.8:
- spatial S = HW * softmax_hw(mean_c |F| / tau)   (authors' code: mean over C, the paper writes a sum);
- channel A = C * softmax_c(|F| / tau), computed *per location* (B, C, H, W), as the paper says and the code does.

Losses, per level l, batch mean, following the authors' `pgd_cls.py` / `pgd_reg.py` (Eq. 5, 6, 8, 9 in the paper):
- cls = w_l * (alpha * sum S^T A^T M^cls dF^2 + beta * sum S^T A^T N dF^2) / B,   w_l = 1 + level_gain * l
- reg = gamma * mean_{I^reg != 0} [mean_c(A^T dF^2) * I^reg]    (raw Gaussian weights, positives pooled over the batch)
- att = delta * (sum |A^S - A^T| / (B H W) + ref_area / (H_img W_img) * sum |S^S - S^T| / B)      (cls branch)
      + delta * sum_{I^reg != 0} |A^S - A^T| / #{I^reg != 0}                                     (reg branch)
with dF = F^T - F^S; sums over C, H, W; w_l applies to the cls feature terms only, as in the authors' configs.

Deviations and why:
- per-image masks, and alpha, beta scaled to match. The authors' cls loss unsqueezes an already (N, 1, H, W) mask,
  so it broadcasts to (N, N, C, H, W): each image's features are weighted by the sum of the masks of all N images
  on the GPU, N = 4 in their configs (`samples_per_gpu=4`, work_configs/base/1x_setting.py). That makes the loss
  depend on batch composition; here each image uses its own masks (paper, FGD). But it also made their fg and bg
  terms about N times the size that alpha and beta give here, relative to the box and attention terms (which are
  not broadcast). So the defaults are the authors' effective weights, 4x their config: alpha = 4 * 0.04 = 0.16
  (the background's authors' value becomes 4 * 0.02 = 0.08); gamma and delta are theirs.
- the spatial-attention term is a sum over H*W; scaling it by ref_area / (H_img W_img) equals the code at 640x640
  and keeps it size-invariant (the other terms already are: masks sum to <= 1, the channel term is a mean).
- masks: in-box before top-K, no x/y swap, 1 px^2 covariance floor instead of random noise (see `pgd_masks`).
- YOLO has P3-P5 only, so w_l = 1.0, 1.25, 1.5 (the code's P3-P7 weights go to 2.0). 0.04 is the authors' alpha
  for anchor-free GFL/FCOS students (the paper's "0.4" is a typo); gamma = 1.6 * 0.04. The cls feature term sums
  over C_T channels, so its scale follows the teacher's cls width (tuned at C = 256).
- the authors initialise the student's neck and head from the teacher; that needs equal widths and is not done.
- beta = 0 by default (authors: 0.5 alpha). The background term is FGD's, inherited by PGD; PGD's own contribution,
  and all its ablations (Tab. 5-7), are about the foreground. On the 8-epoch warm-start CPU benchmark the authors'
  beta left the student below plain on 3/3 seeds (-0.020 mAP50-95); beta = 0 put it above on 3/3 (+0.009)
  (docs/experiments.md). `pgd_beta=0.08` restores the authors' recipe.
"""

from __future__ import annotations

import torch

from yolokd.adapters import level_aligners
from yolokd.methods._common import prepare
from yolokd.methods.base import DistillMethod, StepContext, register
from yolokd.methods.dfd import spatial_attention as _hw_softmax_attention
from yolokd.methods.pgd_masks import ground_truth, level_index, normalise_per_level, pgw_masks
from yolokd.taps import Features


def spatial_attention(f: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 7 (code form): (B, C, H, W) -> (B, H, W) = H*W * softmax_hw(mean_c |F| / tau)."""
    return _hw_softmax_attention(f / tau)


def channel_attention(f: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 7: (B, C, H, W) -> (B, C, H, W) = C * softmax_c(|F| / tau), independently at every location."""
    return f.shape[1] * (f.abs() / tau).softmax(1)


def cls_level_terms(
    fs: torch.Tensor, ft: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level of the cls-branch loss, unweighted.

    Args:
        fs (torch.Tensor): adapted student feature (B, C, H, W).
        ft (torch.Tensor): teacher feature (B, C, H, W).
        fg (torch.Tensor): normalised foreground mask M (B, H, W).
        bg (torch.Tensor): normalised background mask N (B, H, W).
        tau (float): attention temperature.

    Returns:
        (fg, bg, channel-attention, spatial-attention) terms, each a batch mean:
        sum S^T A^T M dF^2 / B, sum S^T A^T N dF^2 / B, sum |A^S - A^T| / (B H W), sum |S^S - S^T| / B.
    """
    b, _, h, w = ft.shape
    s_t, a_t = spatial_attention(ft, tau), channel_attention(ft, tau)
    err = (s_t[:, None] * a_t * (ft - fs).pow(2)).sum(1)  # (B, H, W)
    fg_term = (err * fg).sum() / b
    bg_term = (err * bg).sum() / b
    att_c = (channel_attention(fs, tau) - a_t).abs().sum() / (b * h * w)
    att_s = (spatial_attention(fs, tau) - s_t).abs().sum() / b
    return fg_term, bg_term, att_c, att_s


def reg_level_terms(
    fs: torch.Tensor, ft: torch.Tensor, importance: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One level of the box-branch loss, unweighted, on the locations where the raw importance I^reg (B, H, W) > 0.

    Returns:
        (mean over positives of mean_c(A^T dF^2) * I^reg, sum over positives of sum_c |A^S - A^T| / #positives);
        both 0 (still attached to `fs`) when the level has no positive.
    """
    pos = importance > 0
    npos = pos.sum().clamp(min=1)
    a_t = channel_attention(ft, tau)
    fea = ((a_t * (ft - fs).pow(2)).mean(1) * importance).sum() / npos
    att = ((channel_attention(fs, tau) - a_t).abs().sum(1) * pos).sum() / npos
    return fea, att


@register
class PGD(DistillMethod):
    name = "pgd"
    summary = "PGD: head-branch feature imitation on the teacher's Gaussian-weighted top-K quality regions + attention"
    aligned = {"align_cls": "cls_feat", "align_box": "box_feat"}
    taps = frozenset({"cls_feat", "box_feat"})

    def __init__(
        self,
        student: Features,
        teacher: Features,
        *,
        alpha: float,
        beta: float,
        gamma: float,
        delta: float,
        tau: float,
        xi_cls: float,
        xi_reg: float,
        topk: int,
        level_gain: float,
        ref_area: int,
    ):
        super().__init__()
        self.alpha, self.beta, self.gamma, self.delta, self.tau = alpha, beta, gamma, delta, tau
        self.xis, self.topk, self.level_gain, self.ref_area = (xi_cls, xi_reg), int(topk), level_gain, ref_area
        self.strides = tuple(float(x) for x in student.strides)
        self.align_cls = level_aligners(student.cls_feat, teacher.cls_feat)
        self.align_box = level_aligners(student.box_feat, teacher.box_feat)

    def masks(self, t: Features, ctx: StepContext) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Teacher-only masks per level: (M^cls normalised, N normalised, I^reg raw), each a list of (B, H_l, W_l)."""
        shapes = [f.shape[-2:] for f in t.cls_feat]
        sizes = [h * w for h, w in shapes]
        anchor_points, stride = t.anchors
        (i_cls, i_reg), bg = pgw_masks(
            t.scores, t.boxes_xyxy, anchor_points * stride, ground_truth(ctx.assign, ctx.batch),
            self.xis, self.topk, self.strides,
        )
        levels = level_index(sizes, bg.device)
        fg, bg = normalise_per_level(i_cls, levels), normalise_per_level(bg.float(), levels)

        def per_level(m):
            return [x.view(-1, *hw) for x, hw in zip(m.split(sizes, 1), shapes)]

        return per_level(fg), per_level(bg), per_level(i_reg)

    def forward(self, s: Features, t: Features, ctx: StepContext) -> dict[str, torch.Tensor]:
        s, t = prepare(s, t)  # fp32, teacher detached (already so when called by the criterion)
        fg, bg, imp_reg = self.masks(t, ctx)
        self.record("cls_mask", *fg)  # M^cls (Eq. 4): the Gaussian key predictive regions, zero off the top-K
        self.record("bg_mask", *bg)
        self.record("reg_mask", *imp_reg)  # I^reg (Eq. 3), raw
        h, w = ctx.img_hw
        area_scale = self.ref_area / (h * w)
        cls = reg = att = 0.0
        for l, (a_c, a_b) in enumerate(zip(self.align_cls, self.align_box)):
            fs, ft = a_c(s.cls_feat[l]), t.cls_feat[l]
            fg_t, bg_t, att_c, att_s = cls_level_terms(fs, ft, fg[l], bg[l], self.tau)
            cls = cls + (1 + self.level_gain * l) * (self.alpha * fg_t + self.beta * bg_t)
            fs, ft = a_b(s.box_feat[l]), t.box_feat[l]
            fea_r, att_r = reg_level_terms(fs, ft, imp_reg[l], self.tau)
            reg = reg + self.gamma * fea_r
            att = att + self.delta * (att_c + area_scale * att_s + att_r)
        return {"cls": cls, "reg": reg, "att": att}
