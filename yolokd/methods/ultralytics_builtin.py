"""`method=ultralytics`: Ultralytics' own distillation (`distill_model=`, `nn/distill_model.py`), run by Ultralytics.

Not re-implemented here: choosing it makes the trainer pass `distill_model=<teacher>` to Ultralytics, which wraps
the student in its `DistillationModel` (per-level 1x1-ReLU-1x1 projector, L2 weighted by the teacher's max class
score, weight `dis=`, default 6.0, logged as `dis_loss`). It exists as a method name so every comparison runs it
through the same command, data, checks and seeds as yolokd's methods. It cannot be combined with other methods.
"""

from yolokd.methods.base import DistillMethod, register


@register
class UltralyticsBuiltin(DistillMethod):
    name = "ultralytics"
    summary = "Ultralytics' built-in distill_model= (score-weighted L2 at the neck; weight: Ultralytics' dis=)"
    delegated = True  # the trainer hands it to Ultralytics; no yolokd loss module is built

    def forward(self, s, t, ctx):
        raise RuntimeError("method=ultralytics is run by Ultralytics' trainer, not by DistillationLoss")
