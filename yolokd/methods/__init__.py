"""Built-in distillation methods. Importing this package registers them; `base.list_methods()` lists them."""

from yolokd.methods import dfd, fitnet, ultralytics_builtin  # noqa: F401  (registration side effect)
from yolokd.methods.base import DistillMethod, MethodSet, StepContext, get_method, list_methods, parse_methods, register

__all__ = ["DistillMethod", "MethodSet", "StepContext", "get_method", "list_methods", "parse_methods", "register"]
