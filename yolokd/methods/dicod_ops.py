"""DICOD's spatial-transformer crop: differentiable boxes -> fixed-size object images (Guo et al., NeurIPS'21).

For a box B_k = (x1, y1, x2, y2) in an image of width w and height h (slides, Eq. 1):

    A_k = [[(x2 - x1)/w, 0, -1 + (x1 + x2)/w],
           [0, (y2 - y1)/h, -1 + (y1 + y2)/h]],      O_k = f_ST(A_k, I, s) = grid_sample(I, affine_grid(A_k, s x s))

With `align_corners=False` the output's outer pixel edges land on the box edges, so the whole-image box gives the
identity transform and O = I when s equals the image size. The crop is differentiable w.r.t. the box (through
the bilinear weights), which is what lets DICOD's localization term move predicted boxes.

Choices (YOLO adaptations, docs/methods.md#dicod):
- boxes are made finite, kept within one image size of the image (a box may overshoot the border: clamping it to
  the image, as the authors do, would zero the gradient of every overshooting side, i.e. of all predicted boxes
  at initialization on small inputs) and given a minimum size of 1 px, so no box can produce NaN;
- samples falling outside the image read zeros (the authors' padding): an overshooting predicted box shows a
  black margin that its GT crop lacks, which the localization term penalizes;
- everything runs in fp32; each image is sampled once for all its boxes (one grid of n*s x s), so the image is
  never copied per box.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clamp_boxes(boxes: torch.Tensor, hw: tuple[int, int], min_size: float = 1.0, margin: float = 1.0) -> torch.Tensor:
    """(N, 4) xyxy px -> finite fp32 boxes at least `min_size` px wide and high, within `margin` image sizes of it.

    Coordinates inside [-margin*w, (1+margin)*w] (resp. h) keep their gradient; NaN becomes 0 and +-inf the bound.
    """
    h, w = hw
    lo_x, hi_x, lo_y, hi_y = -margin * w, (1 + margin) * w, -margin * h, (1 + margin) * h
    b = torch.nan_to_num(boxes.float(), nan=0.0, posinf=float(max(hi_x, hi_y)), neginf=float(min(lo_x, lo_y)))
    x1 = b[:, 0].clamp(lo_x, hi_x - min_size)
    y1 = b[:, 1].clamp(lo_y, hi_y - min_size)
    x2 = torch.maximum(b[:, 2].clamp(max=hi_x), x1 + min_size)
    y2 = torch.maximum(b[:, 3].clamp(max=hi_y), y1 + min_size)
    return torch.stack((x1, y1, x2, y2), 1)


def box_theta(boxes: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Eq. 1: (N, 4) xyxy px boxes -> (N, 2, 3) affine matrices mapping the crop's [-1, 1]^2 onto the box."""
    h, w = hw
    x1, y1, x2, y2 = boxes.unbind(1)
    zero = torch.zeros_like(x1)
    row_x = torch.stack(((x2 - x1) / w, zero, (x1 + x2) / w - 1), 1)
    row_y = torch.stack((zero, (y2 - y1) / h, (y1 + y2) / h - 1), 1)
    return torch.stack((row_x, row_y), 1)


def crop_boxes(img: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor, size: int) -> torch.Tensor:
    """Crop and resize boxes to size x size images, differentiably w.r.t. `boxes`.

    Args:
        img (torch.Tensor): (B, C, H, W) images.
        boxes (torch.Tensor): (N, 4) xyxy boxes in pixels of `img` (any values: bounded, see `clamp_boxes`).
        batch_idx (torch.Tensor): (N,) image index of each box.
        size (int): output side s.

    Returns:
        (torch.Tensor): (N, C, s, s) fp32 crops, in the order of `boxes`.
    """
    n, c = boxes.shape[0], img.shape[1]
    if n == 0:
        return img.new_zeros((0, c, size, size), dtype=torch.float32)
    hw = tuple(img.shape[-2:])
    theta = box_theta(clamp_boxes(boxes, hw), hw)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)  # (N, s, s, 2)
    parts, order = [], []
    for b in batch_idx.unique().tolist():
        sel = (batch_idx == b).nonzero().squeeze(1)
        g = grid[sel].reshape(1, len(sel) * size, size, 2)  # all boxes of image b as one tall grid
        o = F.grid_sample(img[b : b + 1].float(), g, mode="bilinear", padding_mode="zeros", align_corners=False)
        parts.append(o.view(c, len(sel), size, size).transpose(0, 1))
        order.append(sel)
    return torch.cat(parts)[torch.cat(order).argsort()]
