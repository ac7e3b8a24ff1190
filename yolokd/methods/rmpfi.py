"""RM + PFI, the full recipe of Li et al. (AAAI 2022): L_task + alpha * L_RM + beta * L_PFI (Eq. 10).

It holds a `RankMimicking` and a `PFI` module and returns their terms side by side ("cls", "loc", "pfi"). Its only
key of its own is `fade` (`rmpfi_fade`, 0.5): its terms fade linearly to 0 over the last half of training, from
where its lead over the plain student peaks (docs/benchmarks.md; the criterion applies it, `method_fade`). For the
rest it reads the `rm_*` and `pfi_*` train arguments but `rm_fade` (alpha = rm_weight = 4, beta = pfi_weight =
1.5 by default), so `method=rmpfi` computes the loss of `method=rm+pfi` with its own fade on all three terms (in
`rm+pfi`, `rm_fade` fades rm's terms only), and the paper's constant weights with `rmpfi_fade=0`.
"""

from __future__ import annotations

import torch

from yolokd.config import method_hparams, prefixed
from yolokd.methods.base import DistillMethod, StepContext, register
from yolokd.methods.pfi import PFI
from yolokd.methods.rm import RankMimicking
from yolokd.taps import Features


@register
class RMPFI(DistillMethod):
    name = "rmpfi"
    summary = "Rank Mimicking + PFI, the paper's full recipe (takes the rm_* and pfi_* arguments)"
    parts = (RankMimicking, PFI)
    uses_args = tuple(k for part in parts for k in prefixed(part.name, method_hparams(part.name, {})))
    needs_teacher_positives = True

    @classmethod
    def check_inputs(cls, args: dict, data: dict | None) -> None:
        for part in cls.parts:
            part.check_inputs(args, data)

    def __init__(self, student: Features, teacher: Features, **args):
        super().__init__()
        self.rm, self.pfi = (part(student, teacher, **{k[len(part.name) + 1:]: v for k, v in args.items()
                                                      if k.startswith(f"{part.name}_")}) for part in self.parts)

    def forward(self, s: Features, t: Features, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {**self.rm(s, t, ctx), "pfi": self.pfi(s, t, ctx)["loss"]}
