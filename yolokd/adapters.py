"""Channel aligners: trainable maps from student feature widths to teacher widths.

They belong to the distillation loss, not to the student: the trainer adds their parameters to the optimizer,
averages their gradients across DDP ranks and saves them beside (never inside) the student checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn
from ultralytics.nn.modules import Conv

# `<method>_projector=` of the methods that take one: "conv" is the 1x1 map below; "branch" is the student-side
# projection of the PDF-Distil authors' code (zhanghengdev/MutualGuide, models/detector.py `dist_layers`): a 3x3
# conv + BN + activation, then a 1x1 conv, always present (also when the widths match) and dropped at inference.
PROJECTORS = ("conv", "branch")


def aligner(c_student: int, c_teacher: int, projector: str = "conv") -> nn.Module:
    """A student-to-teacher channel map: `projector` "conv" is a 1x1 convolution, or identity when the widths already
    match; "branch" is Ultralytics' Conv (3x3 conv, BN, SiLU) to `c_teacher` channels followed by a 1x1 convolution."""
    if projector not in PROJECTORS:
        raise ValueError(f"projector='{projector}' is not one of {', '.join(PROJECTORS)}")
    if projector == "branch":
        return nn.Sequential(Conv(c_student, c_teacher, 3), nn.Conv2d(c_teacher, c_teacher, kernel_size=1))
    return nn.Identity() if c_student == c_teacher else nn.Conv2d(c_student, c_teacher, kernel_size=1)


def level_aligners(student: list[torch.Tensor], teacher: list[torch.Tensor], projector: str = "conv") -> nn.ModuleList:
    """One `aligner` per pyramid level, sized from example student and teacher feature maps."""
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} feature levels, teacher {len(teacher)}")
    return nn.ModuleList(aligner(s.shape[1], t.shape[1], projector) for s, t in zip(student, teacher))


@torch.no_grad()
def fit_aligner(align: nn.Module, student: torch.Tensor, teacher: torch.Tensor, ridge: float = 1.0) -> bool:
    """Set a 1x1 aligner to the ridge least-squares map from student to teacher features of one batch.

    Every position of `student` (B, C_s, H, W) and `teacher` (B, C_t, H, W) is one sample: W, b minimise
    sum ||X^t - (W X^s + b)||^2 + lambda ||W||^2, with lambda = `ridge` * mean eigenvalue of the centred Gram matrix.
    A randomly initialised aligner makes the first few hundred steps of an imitation loss push the student towards a
    random projection of the teacher; fitted, the residual it leaves is what the student's features cannot yet
    express linearly, which is the signal an imitation loss is meant to carry. An `nn.Identity` is left alone.
    Returns False when `align` is neither (a `branch` projector), which keeps its random initialisation.
    """
    if not isinstance(align, nn.Conv2d):
        return isinstance(align, nn.Identity)
    x = student.detach().double().permute(0, 2, 3, 1).reshape(-1, student.shape[1])
    y = teacher.detach().double().permute(0, 2, 3, 1).reshape(-1, teacher.shape[1])
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), xc.T @ yc)
    align.weight.copy_(w.T.reshape(align.weight.shape).to(align.weight.dtype))
    align.bias.copy_((my - mx @ w).to(align.bias.dtype))
    return True
