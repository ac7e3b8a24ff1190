"""The method contract, the registry, and `MethodSet` (several methods summed: `method=pgd+rm`).

A method is an `nn.Module` that owns its trainable adapters and computes named, weighted loss terms:

    class MyMethod(DistillMethod):
        name = "my"                      # the `method=` value; hyper-parameters come from cfg/methods/my.yaml
        summary = "one line for `yolokd methods`"
        taps = frozenset({"cls_feat"})    # branch features it needs besides neck/scores/boxes (see taps.py)

        def __init__(self, student: Features, teacher: Features, *, weight: float): ...
        def forward(self, s: Features, t: Features, ctx: StepContext) -> dict[str, Tensor]: ...

`__init__` receives the features of a dry forward pass (for shapes) and the YAML's keys as keyword arguments, all
of them required: `cfg/methods/<name>.yaml` is the only place defaults live (build a method with its defaults
through `MethodSet` or `build_method`). A key in the YAML that the method does not take fails at once. `forward`
returns batch-mean scalars already multiplied by their weights. Teacher tensors arrive detached and every tensor in
fp32. A method declares which of its terms are already on the task loss's scale (`task_scaled`): `MethodSet` hands
each term on as a `Term` that carries that, and `yolokd/criterion.py` (`scale_terms`) is where the cap and the fade
act on the others, and the sum joins the task loss.

Recording: `forward` calls `self.record(key, tensor)` at the point where its loss uses a tensor worth seeing (a mask,
a weight map, a ranking). Inside `with method_set.recording() as records:` those very tensors are kept, per branch,
method and key, and `yolokd explain` draws them; outside it `record` stores nothing, so a training step pays one
attribute test per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from ultralytics.utils import LOGGER

from yolokd.adapters import fit_aligner
from yolokd.config import DistillationConfigError, closest, kd_defaults, method_fade, method_hparams
from yolokd.taps import Assignment, Features

_REGISTRY: dict[str, type[DistillMethod]] = {}
ADAPTER_INITS = ("lstsq", "random")  # `adapter_init=`: see MethodSet.fit_adapters


def check_choice(key: str, value, allowed: tuple[str, ...]) -> None:
    """A string hyper-parameter `key` (e.g. `pdf_projector`) must be one of `allowed`; None (YAML default) passes."""
    if value is not None and value not in allowed:
        raise DistillationConfigError(f"{key}='{value}' is not one of: {', '.join(allowed)}")


def check_adapter_init(value) -> str:
    """The `adapter_init` train argument, lower-cased, or a clear error naming the choices."""
    init = str(value or "").lower()
    if init not in ADAPTER_INITS:
        raise DistillationConfigError(
            f"adapter_init='{value}' is not one of: {', '.join(ADAPTER_INITS)} "
            "(lstsq fits the 1x1 aligners to the first batch; random keeps PyTorch's initialisation)."
        )
    return init


@dataclass(frozen=True)
class Term:
    """One weighted distillation term of a step, as `MethodSet` hands it to the criterion.

    `capped`: `kd_max_ratio`, `kd_ramp` and the fade act on it (False for terms normalised like Ultralytics' own
    losses, which the method declares as `task_scaled`). `fade`: its method's fade (`method_fade`), which the
    criterion's `schedule_factor` reads for capped terms."""

    value: torch.Tensor
    capped: bool = True
    fade: float = 0.0


@dataclass
class StepContext:
    """Read-only facts about the current step that are not features of either model."""

    batch: dict  # the preprocessed Ultralytics batch (img in [0, 1], cls, bboxes, batch_idx, ...)
    assign: Assignment | None  # the student's task-aligned assignment (None outside training steps)
    epoch: int = 0
    epochs: int = 1
    teacher_assign: Assignment | None = None  # the same assigner on the teacher's predictions (needs_teacher_positives)
    branch: str = "one2many"  # the head branch the features and assignments are of ("one2one": YOLO26's deployed one)

    @property
    def img_hw(self) -> tuple[int, int]:
        """Input height and width in pixels."""
        return tuple(self.batch["img"].shape[-2:])


class DistillMethod(nn.Module):
    """Base class of a distillation method (see module docstring)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    taps: ClassVar[frozenset[str]] = frozenset()
    needs_teacher: ClassVar[bool] = True
    uses_args: ClassVar[tuple[str, ...]] = ()  # top-level train arguments it takes as keywords (e.g. cls_teacher)
    # True: every term is normalised like Ultralytics' own losses (kd_max_ratio and kd_fade skip it); or the names
    # of such terms
    task_scaled: ClassVar[bool | frozenset[str]] = False
    teacher_assigns: bool = False  # True: the student's task loss is assigned from the teacher's predictions (LAD)
    needs_teacher_positives: ClassVar[bool] = False  # True: `StepContext.teacher_assign` is filled (Rank Mimicking)
    head_level: ClassVar[bool] = True  # reads the head's outputs: also run on YOLO26's one-to-one branch (criterion)
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}  # {string hyper-parameter: allowed values}, see check_inputs
    aligned: ClassVar[dict[str, str]] = {}  # {aligner ModuleList attribute: Features field it maps}, for fit_adapters
    _sink: dict[str, list[torch.Tensor]] | None = None  # where `record` keeps tensors; set by `MethodSet.recording`

    def record(self, key: str, *values: torch.Tensor) -> None:
        """Keep `values`, the very tensors the loss uses where this is called (e.g. one per pyramid level), under
        `key` while `MethodSet.recording` is on, for `yolokd explain` to draw; nothing is kept otherwise."""
        if self._sink is not None:
            self._sink.setdefault(key, []).extend(values)

    @classmethod
    def check_inputs(cls, args: dict, data: dict | None) -> None:
        """Pre-flight check of the method's own inputs (train arguments, dataset dict), before any run folder
        exists; raise `DistillationConfigError` naming the problem and the fix. Default: the `choices`."""
        for key, allowed in cls.choices.items():
            check_choice(f"{cls.name}_{key}", args.get(f"{cls.name}_{key}"), allowed)

    @classmethod
    def prepare_inputs(cls, args: dict, data: dict | None) -> None:
        """After every check has passed and before the run folder exists: make what the method's arguments ask to be
        made (DICOD's `cls_teacher=auto`), and point `args` at it, in place. Default: nothing."""

    def fit_adapters(self, s: Features, t: Features) -> None:
        """Least-squares initialisation of the method's 1x1 aligners (`aligned`), and of those of the methods it
        holds (rmpfi), on one batch (see `fit_aligner`)."""
        for attr, field in self.aligned.items():
            fitted = [fit_aligner(align, xs, xt)  # it solves in float64 whatever the features' dtype
                      for align, xs, xt in zip(getattr(self, attr), getattr(s, field), getattr(t, field))]
            if not all(fitted):
                LOGGER.warning(f"adapter_init=lstsq fits 1x1 projectors only: {self.name}.{attr} are branches "
                               f"({self.name}_projector=branch) and keep their random initialisation.")
        for child in self.children():
            if isinstance(child, DistillMethod):
                child.fit_adapters(s, t)

    @classmethod
    def is_task_scaled(cls, term: str) -> bool:
        """Whether the method's term `term` is on the task loss's scale (`task_scaled`): then it is not capped."""
        return cls.task_scaled is True or (bool(cls.task_scaled) and term in cls.task_scaled)

    def forward(self, s: Features, t: Features | None, ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def register(cls: type[DistillMethod]) -> type[DistillMethod]:
    """Class decorator: make a method available as `method=<cls.name>`."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def _ensure_builtin():
    import yolokd.methods  # noqa: F401  (its __init__ imports every built-in method module)


def list_methods() -> list[str]:
    """Names of all registered methods."""
    _ensure_builtin()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[DistillMethod]:
    """The method class registered as `name`; a clear error with the nearest names otherwise."""
    _ensure_builtin()
    if name not in _REGISTRY:
        raise DistillationConfigError(
            f"Unknown distillation method '{name}'.{closest(name, list(_REGISTRY))} "
            f"Available: {', '.join(sorted(_REGISTRY))} (see `yolokd methods`)."
        )
    return _REGISTRY[name]


def parse_methods(spec: str) -> list[str]:
    """`"pgd+rm"` -> `["pgd", "rm"]`, each checked against the registry; duplicates and empty parts rejected."""
    names = [n.strip().lower() for n in str(spec).split("+")]
    if not all(names):
        raise DistillationConfigError(f"method='{spec}' has an empty part; join method names with '+', e.g. method=pgd+rm")
    if len(set(names)) != len(names):
        raise DistillationConfigError(f"method='{spec}' names a method twice")
    for n in names:
        get_method(n)
    return names


def build_method(name: str, student: Features, teacher: Features | None, args=None, **overrides) -> DistillMethod:
    """The method `name` with its hyper-parameters from the train arguments `args` (a dict or namespace; missing
    keys: the YAML defaults), then `overrides` (un-prefixed keys, e.g. `weight=2.0`)."""
    cls = get_method(name)
    args = {} if args is None else args
    get = args.get if isinstance(args, dict) else lambda k, d: getattr(args, k, d)
    defaults = kd_defaults()
    extra = {a: get(a, defaults.get(a)) for a in cls.uses_args}
    return cls(student, teacher, **{**method_hparams(cls.name, args), **extra, **overrides})


class MethodSet(nn.Module):
    """Several methods, summed. Owns all adapters, so `parameters()` is what the optimizer must add."""

    def __init__(self, names: list[str], student: Features, teacher: Features | None, args):
        super().__init__()
        self.methods = nn.ModuleDict({n: build_method(n, student, teacher, args) for n in names})
        self.fades = {n: method_fade(n, args) for n in names}  # each method's fade (kd_fade, or its own)
        init = check_adapter_init(getattr(args, "adapter_init", "random"))
        # saved with the adapters (kd_state.pt), so a resumed run does not fit them again
        self.register_buffer("adapters_fitted", torch.tensor(init == "random"))
        self._fitted: bool | None = None  # the buffer as a Python bool, read at the first step (no device sync after)
        self._records: dict | None = None  # {branch: {method: {key: [tensor, ...]}}} while `recording` is on

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, dict[str, dict[str, list[torch.Tensor]]]]]:
        """Within the block, every tensor a method `record`s in a step is kept in the yielded dict, as
        `records[branch][method][key]` (branch "one2many", or "one2one" for YOLO26's second pass)."""
        self._records = records = {}
        try:
            yield records
        finally:
            self._records = None
            for m in self.modules():
                if isinstance(m, DistillMethod):
                    m._sink = None

    def fit_adapters(self, s: Features, t: Features | None) -> bool:
        """On the first training batch only (`adapter_init=lstsq`): fit every method's aligners to it. True if it did."""
        if self._fitted is None:  # first step: after a resume has loaded the buffer
            self._fitted = bool(self.adapters_fitted)
        if self._fitted or t is None:
            return False
        for m in self.methods.values():
            m.fit_adapters(s, t)
        self.adapters_fitted.fill_(True)
        self._fitted = True
        return True

    @property
    def teacher_assigns(self) -> bool:
        """True if a method asks for the student's task loss to use the teacher's assignment (`_TeacherAssignment`)."""
        return any(m.teacher_assigns for m in self.methods.values())

    @property
    def needs_teacher_positives(self) -> bool:
        """True if a method reads the teacher's assignment (`StepContext.teacher_assign`)."""
        return any(m.needs_teacher_positives for m in self.methods.values())

    @property
    def taps(self) -> set[str]:
        """Union of the branch taps the methods need."""
        return set().union(*(m.taps for m in self.methods.values()))

    @property
    def capped_methods(self) -> list[str]:
        """The methods with some capped term (not `task_scaled`)."""
        return [n for n, m in self.methods.items() if m.task_scaled is not True]

    @property
    def caps_any_term(self) -> bool:
        """True if some term of these methods is capped: the criterion then logs `kd_scale`."""
        return bool(self.capped_methods)

    def forward(self, s: Features, t: Features | None, ctx: StepContext, head_only: bool = False,
                capped_view: Features | None = None) -> dict[str, Term]:
        """All terms as `{column: Term}`: column `<method>_<term>`, or `<method>` for a one-term method; each Term says
        whether the cap applies, from its method's `task_scaled`, and carries its method's fade (`head_only`: the
        `head_level` methods' only).
        `capped_view`: the student's features for the methods with a capped term (the criterion's gradient-share
        cap, `kd_grad_ratio`); default `s`."""
        out = {}
        for name, m in self.methods.items():
            if head_only and not m.head_level:
                continue
            if self._records is not None:  # recording: this method and the methods it holds (rmpfi) keep theirs here
                sink = self._records.setdefault(ctx.branch, {}).setdefault(name, {})
                for sub in m.modules():
                    if isinstance(sub, DistillMethod):
                        sub._sink = sink
            view = s if capped_view is None or m.task_scaled is True else capped_view
            terms = {k: Term(v, capped=not m.is_task_scaled(k), fade=self.fades[name])
                     for k, v in m(view, t, ctx).items()}
            out.update({name: next(iter(terms.values()))} if len(terms) == 1 else {f"{name}_{k}": v for k, v in terms.items()})
        return out
