"""RM + PFI, the full recipe of Li et al. (AAAI 2022): L_task + alpha * L_RM + beta * L_PFI (Eq. 10).

It holds a `RankMimicking` and a `PFI` module and returns their terms side by side ("cls", "loc", "pfi"). It has
no hyper-parameters of its own: it reads the `rm_*` and `pfi_*` train arguments (alpha = rm_weight = 4,
beta = pfi_weight = 1.5 by default), so `method=rmpfi` and `method=rm+pfi` compute the same loss with the same
settings; this name only makes the paper's recipe one method with its own columns.
"""

from __future__ import annotations

import torch

from yolokd.methods.base import DistillMethod, StepContext, register
from yolokd.methods.pfi import PFI
from yolokd.methods.rm import RankMimicking
from yolokd.taps import Features


@register
class RMPFI(DistillMethod):
    name = "rmpfi"
    summary = "Rank Mimicking + PFI, the paper's full recipe (takes the rm_* and pfi_* arguments)"
    uses_args = ("rm_weight", "rm_loc_weight", "rm_loc_temperature", "rm_scores", "pfi_weight", "pfi_faithful",
                 "pfi_detach")

    @classmethod
    def check_inputs(cls, args: dict, data: dict | None) -> None:
        RankMimicking.check_inputs(args, data)

    def __init__(self, student: Features, teacher: Features, *, rm_weight: float, rm_loc_weight: float,
                 rm_loc_temperature: float, rm_scores: str, pfi_weight: float, pfi_faithful: bool,
                 pfi_detach: bool):
        super().__init__()
        self.rm = RankMimicking(student, teacher, weight=rm_weight, loc_weight=rm_loc_weight,
                                loc_temperature=rm_loc_temperature, scores=rm_scores)
        self.pfi = PFI(student, teacher, weight=pfi_weight, faithful=pfi_faithful, detach=pfi_detach)

    def forward(self, s: Features, t: Features, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {**self.rm(s, t, ctx), "pfi": self.pfi(s, t, ctx)["loss"]}
