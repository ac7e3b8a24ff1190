"""Disparity Feature Distillation, DFD (Liu et al., ICML 2024), on the three neck levels.

Paper (Sec. 3.2), per image and level, with F^T the teacher feature and F^S' the width-aligned student feature:
- spatial attention A(F) = HW * softmax_hw((1/C) sum_c |F|)                                   (Eq. 2)
- disparity D = |A(F^T) - A(F^S')|, threshold P = mean(D)                                     (Eq. 3)
- high-disparity region HD = {D >= P}, low-disparity LD = the rest                             (Eq. 4)
- L_HD = sum_HD (F^T - f(F^S'))^2 through a learnable transformation f, L_LD = sum_LD (F^T - F^S')^2  (Eq. 5, 6)
- L = alpha * L_HD + beta * L_LD, one-stage alpha = 2.8e-5, beta = 1e-5                           (Eq. 7)
f = Conv1x1(C->2C) - ReLU - Conv3x3(2C->2C) - ReLU - Conv1x1(2C->C)  (Tab. 5, "Conv1-3-1(2C)").

Choices where the paper is silent (no official code was released; see docs/methods.md#dfd):
- sums run over C, H, W per image, then a mean over the batch and a sum over levels (MGD-style, which matches the
  magnitude of alpha and beta);
- the sum is rescaled by ref_area / (H_img * W_img) so it equals the paper's at 640x640 and does not grow with
  the input size;
- HD uses a strict D > P, so identical features (D = 0 everywhere) fall wholly in LD and give L = 0;
- A, D and the mask are computed under no_grad in fp32: they select regions, they are not trained;
- F^S' = 1x1 conv of the student feature when its width differs from the teacher's (identity otherwise);
- the paper's student and teacher share the width C. Here f reads the raw student feature (C = student width)
  and its last 1x1 conv maps to the teacher width: f(F^S) instead of f(F^S'). The 3x3 conv then runs at 2*C_s
  instead of 2*C_t, about 4x cheaper for a teacher twice as wide (it dominated the step time otherwise);
- f's hidden width is the paper's 2C (Tab. 5's "Conv1-3-1(2C)"; the narrower variants did worse there), with
  C = 64, 128, 256 for a v8n student. `hidden_cap` bounds it (64 was the default before: narrower than the paper's
  narrowest variant). Measured with `yolokd overhead model=yolov8n.yaml teacher=yolov8s.yaml imgsz=128 batch=16
  threads=1`: distillation step / (student step + teacher forward) = 1.14 at 2C, 1.02 at `hidden_cap=64`.
"""

from __future__ import annotations

import torch
from torch import nn

from yolokd.adapters import level_aligners
from yolokd.methods.base import DistillMethod, StepContext, register
from yolokd.taps import Features


def spatial_attention(f: torch.Tensor) -> torch.Tensor:
    """Eq. 2: (B, C, H, W) -> (B, H, W), H*W * softmax over positions of the channel-mean absolute activation."""
    b, _, h, w = f.shape
    return (h * w) * f.abs().mean(1).flatten(1).softmax(1).view(b, h, w)


@torch.no_grad()
def disparity(f_teacher: torch.Tensor, f_student: torch.Tensor) -> torch.Tensor:
    """Eq. 3: (B, H, W) attention disparity D = |A(F^T) - A(F^S')|."""
    return (spatial_attention(f_teacher.float()) - spatial_attention(f_student.float())).abs()


def split_disparity(d: torch.Tensor) -> torch.Tensor:
    """Eq. 4: (B, H, W) bool, True (HD) where the disparity `d` exceeds its per-image mean P."""
    return d > d.mean(dim=(1, 2), keepdim=True)


def high_disparity_mask(f_teacher: torch.Tensor, f_student: torch.Tensor) -> torch.Tensor:
    """Eq. 3-4: (B, H, W) bool, True where the attention disparity exceeds its per-image mean."""
    return split_disparity(disparity(f_teacher, f_student))


def transformation(c_in: int, c_out: int, hidden_cap: int = 0) -> nn.Sequential:
    """Tab. 5 'Conv1-3-1(2C)': the learnable weak constraint f applied to high-disparity regions (C = c_in)."""
    hidden = 2 * c_in if hidden_cap <= 0 else min(2 * c_in, hidden_cap)
    return nn.Sequential(
        nn.Conv2d(c_in, hidden, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, hidden, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, c_out, 1),
    )


@register
class DFD(DistillMethod):
    name = "dfd"
    summary = "DFD: MSE on low-disparity regions, MSE through a learnable transform on high-disparity ones (neck)"
    aligned = {"align": "neck"}
    head_level = False

    def __init__(self, student: Features, teacher: Features, *, alpha: float, beta: float, ref_area: int, hidden_cap: int):
        super().__init__()
        self.alpha, self.beta, self.ref_area = alpha, beta, ref_area
        self.align = level_aligners(student.neck, teacher.neck)
        self.transform = nn.ModuleList(
            transformation(s.shape[1], t.shape[1], hidden_cap) for s, t in zip(student.neck, teacher.neck)
        )

    def forward(self, s: Features, t: Features, ctx: StepContext) -> dict[str, torch.Tensor]:
        h, w = ctx.img_hw
        scale = self.ref_area / (h * w) / t.neck[0].shape[0]  # size invariance, then mean over the batch
        hd_sum, ld_sum = 0.0, 0.0
        for align, f, fs, ft in zip(self.align, self.transform, s.neck, t.neck):
            fs_aligned = align(fs)
            d = disparity(ft, fs_aligned)
            hd = split_disparity(d).unsqueeze(1)  # (B, 1, H, W)
            self.record("disparity", d)
            self.record("hd_mask", hd)
            hd_sum = hd_sum + ((ft - f(fs)).pow(2) * hd).sum()
            ld_sum = ld_sum + ((ft - fs_aligned).pow(2) * ~hd).sum()
        return {"hd": self.alpha * scale * hd_sum, "ld": self.beta * scale * ld_sum}
