"""Built-in distillation methods. Importing this package registers them; `base.list_methods()` lists them."""

from yolokd.methods import dfd, fitnet, ultralytics_builtin  # noqa: F401  (registration side effect)
from yolokd.methods import pdf, pfi, rm, rmpfi  # noqa: F401  (PDF-Distil, Rank Mimicking, PFI)
from yolokd.methods import pgd  # noqa: F401  (Prediction-Guided Distillation)
from yolokd.methods import dicod  # noqa: F401  (DICOD, classifier teacher)
from yolokd.methods import ld  # noqa: F401  (dense prediction KD: soft classes + Localization Distillation)
from yolokd.methods.base import DistillMethod, MethodSet, StepContext, get_method, list_methods, parse_methods, register

__all__ = ["DistillMethod", "MethodSet", "StepContext", "get_method", "list_methods", "parse_methods", "register"]
