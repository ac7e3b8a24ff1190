"""Channel aligners: trainable maps from student feature widths to teacher widths.

They belong to the distillation loss, not to the student: the trainer adds their parameters to the optimizer,
averages their gradients across DDP ranks and saves them beside (never inside) the student checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn


def aligner(c_student: int, c_teacher: int) -> nn.Module:
    """A 1x1 convolution from `c_student` to `c_teacher` channels, or identity when the widths already match."""
    return nn.Identity() if c_student == c_teacher else nn.Conv2d(c_student, c_teacher, kernel_size=1)


def level_aligners(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> nn.ModuleList:
    """One `aligner` per pyramid level, sized from example student and teacher feature maps."""
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} feature levels, teacher {len(teacher)}")
    return nn.ModuleList(aligner(s.shape[1], t.shape[1]) for s, t in zip(student, teacher))
