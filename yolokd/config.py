"""yolokd's train arguments: where they are defined, how they merge with Ultralytics', how they are checked.

One source of truth: `cfg/default.yaml` (teacher, method, ...) and `cfg/methods/<name>.yaml` (a method's
hyper-parameters). A method key `alpha` in `cfg/methods/dfd.yaml` is the train argument `dfd_alpha`. All of them
sit in one flat namespace beside Ultralytics' own arguments, so `yolokd train dfd_alpha=3e-5 epochs=10` and
`YOLO(...).train(trainer=DistillationTrainer, dfd_alpha=3e-5)` work alike, and Ultralytics' `check_dict_alignment`
rejects a misspelt key with the nearest valid names. `parse_kv` reads the command line's `key=value` words for
every subcommand. Importing this module loads neither torch nor Ultralytics (the CLI's `--help` stays cheap).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from difflib import get_close_matches
from importlib import resources
from pathlib import Path
from typing import Any



class DistillationConfigError(ValueError):
    """A yolokd argument, model or dataset that cannot work; raised before training starts."""


def cfg_dir() -> Path:
    """Return the folder holding `default.yaml`, `methods/` and `examples/` (shipped as the `yolokd.cfg` package).

    Code imported from a source checkout reads that checkout's `cfg/`, even when another checkout is installed
    editable: `yolokd.cfg` maps to the root's `cfg/` (pyproject's package-dir), so the import system would resolve
    it through the editable install and pair one checkout's code with another's YAMLs (e.g. a benchmark clone run
    with `PYTHONPATH`). An installed wheel has no such sibling folder and reads its packaged copy.
    """
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "cfg" / "default.yaml").is_file():
        return root / "cfg"
    return Path(str(resources.files("yolokd.cfg")))


@functools.lru_cache(maxsize=None)
def _load_yaml(path: str) -> dict[str, Any]:
    from ultralytics.utils import YAML

    return dict(YAML.load(path) or {})


def kd_base_defaults() -> dict[str, Any]:
    """yolokd's own top-level arguments (`cfg/default.yaml`) with their defaults."""
    return _load_yaml(str(cfg_dir() / "default.yaml"))


def method_defaults(name: str) -> dict[str, Any]:
    """Hyper-parameters of one method, un-prefixed (`{"alpha": 2.8e-5, ...}`), from `cfg/methods/<name>.yaml`."""
    path = cfg_dir() / "methods" / f"{name}.yaml"
    return _load_yaml(str(path)) if path.exists() else {}


def method_cfg_names() -> list[str]:
    """Names of the methods that have a `cfg/methods/<name>.yaml`."""
    return sorted(p.stem for p in (cfg_dir() / "methods").glob("*.yaml"))


def prefixed(method: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """`{"alpha": 1}` of method `dfd` -> `{"dfd_alpha": 1}`."""
    return {f"{method}_{k}": v for k, v in hparams.items()}


def kd_defaults() -> dict[str, Any]:
    """Every yolokd train argument with its default: the top-level keys plus all methods' prefixed keys."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    out = dict(kd_base_defaults())
    for name in method_cfg_names():
        out.update(prefixed(name, method_defaults(name)))
    clash = set(out) & set(DEFAULT_CFG_DICT)
    if clash:  # a method key that shadows an Ultralytics argument would silently change training
        raise RuntimeError(f"yolokd argument(s) {sorted(clash)} clash with Ultralytics arguments; rename them")
    return out


def full_defaults() -> dict[str, Any]:
    """Ultralytics' defaults extended with yolokd's: the base dict the trainer hands to `get_cfg`."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return {**DEFAULT_CFG_DICT, **kd_defaults()}


def check_train_keys(custom: dict[str, Any], base: dict[str, Any] | None = None) -> None:
    """Every key of `custom` must be a train argument (Ultralytics' or yolokd's, `base`): Ultralytics'
    `check_dict_alignment` decides (deprecated names, `save_dir`, ...), but its 40-line CLI help is kept out and
    the refusal is one line naming the nearest valid keys."""
    import logging

    from ultralytics.cfg import check_dict_alignment
    from ultralytics.utils import LOGGER

    base = full_defaults() if base is None else base
    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)  # the help text is logged at INFO
    try:
        check_dict_alignment(base, custom)
    except SyntaxError as e:
        key = re.search(r"'(.+?)' is not a valid YOLO argument", str(e))
        key = key.group(1) if key else str(e).strip().splitlines()[0]
        raise SyntaxError(  # the exception Ultralytics raises for an unknown key
            f"'{key}' is not a train argument.{closest(key, list(base))} See `yolokd train help` for yolokd's "
            "arguments and `yolo cfg` for Ultralytics'.") from None
    finally:
        LOGGER.setLevel(level)


def split_kd_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a dict of train arguments into (Ultralytics arguments, yolokd arguments)."""
    kd_keys = set(kd_defaults())
    return {k: v for k, v in args.items() if k not in kd_keys}, {k: v for k, v in args.items() if k in kd_keys}


@dataclass(frozen=True)
class Range:
    """An allowed range of a numeric argument, declared in its YAML comment as `# (float >= 0)`, `(int > 0)`,
    `(float in [0, 1])` or `(float in (0, 1])`, next to its default."""

    text: str  # as declared, e.g. ">= 0" or "in [0, 1]"
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False

    @classmethod
    def parse(cls, text: str) -> Range:
        m = re.fullmatch(r"(>=|>)\s*(\S+)|in ([\[(])(\S+),\s*(\S+)\]", text.strip())
        if not m:
            raise ValueError(f"unreadable range '{text}': use '>= x', '> x', 'in [a, b]' or 'in (a, b]'")
        if m.group(1):
            return cls(text.strip(), low=float(m.group(2)), low_open=m.group(1) == ">")
        return cls(text.strip(), low=float(m.group(4)), high=float(m.group(5)), low_open=m.group(3) == "(")

    def __contains__(self, x: float) -> bool:
        return (x > self.low if self.low_open else x >= self.low) and x <= self.high


def check_number(key: str, value: Any, kind: type = int, allowed: str = ">= 1", hint: str = "") -> int | float:
    """A command's own numeric argument as `kind`, or a one-line error naming it: `int` takes whole numbers (1e2
    too, as Ultralytics does), `float` any number; `allowed` is a `Range` text (">= 1", "> 0", "in [0, 1]")."""
    rng = Range.parse(allowed)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    whole = number and (kind is float or (math.isfinite(value) and value == int(value)))
    if not whole or value not in rng:
        raise DistillationConfigError(f"{key}={value} must be {'a whole number' if kind is int else 'a number'} "
                                      f"{rng.text}{hint}.")
    return kind(value)


def check_whole_numbers(key: str, value: Any, allowed: str, example: str) -> tuple[int, ...]:
    """A comma list of whole numbers (`seeds=0,1,2`, `batch=1,8`; one number alone too), each in `allowed` (a `Range`
    text), or a one-line error naming the key and an example."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    items = [int(x) if isinstance(x, str) and x.strip().isdigit() else x for x in items]
    rng = Range.parse(allowed)
    if not items or not all(isinstance(x, int) and not isinstance(x, bool) and x in rng for x in items):
        raise DistillationConfigError(f"{key}={value} must be whole numbers {rng.text} separated by commas, e.g. "
                                      f"{key}={example}.")
    return tuple(items)


_DECLARED = re.compile(r"^(\w+):[^#]*#\s*\((float|int)\s+([^)]+)\)")


@functools.lru_cache(maxsize=None)
def declared_ranges() -> dict[str, Range]:
    """{train argument: Range} for every numeric yolokd argument, read from the YAML comments (the only place a
    range is written): cfg/default.yaml's keys as they are, cfg/methods/<m>.yaml's as `<m>_<key>`."""
    files = [(cfg_dir() / "default.yaml", "")]
    files += [(cfg_dir() / "methods" / f"{m}.yaml", f"{m}_") for m in method_cfg_names()]
    out = {}
    for path, prefix in files:
        for line in path.read_text().splitlines():
            m = _DECLARED.match(line)
            if m:
                out[prefix + m.group(1)] = Range.parse(m.group(3))
    return out


def check_kd_values(kd: dict[str, Any]) -> None:
    """Each yolokd argument given must have its default's kind (true/false for a switch, a number for a weight) and
    lie in its declared range (`declared_ranges`). Ultralytics checks its own keys only: without this,
    `pfi_detach=maybe` would read as true, `dfd_alpha=-1` train a negative loss and `kd_fade=5` switch
    distillation off for the whole run."""
    defaults, ranges = kd_defaults(), declared_ranges()
    for key, value in kd.items():
        default = defaults.get(key)
        if value is None and default is None:  # an empty optional number (kd_fade) left empty
            continue
        shown = "empty" if default is None else default
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, (int, float)) or (default is None and key in ranges):  # kd_fade: empty by default
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            continue
        if not ok:
            raise DistillationConfigError(f"{key}={value!r} must be {kind} (default: {shown}).")
        if key in ranges and (math.isnan(value) or value not in ranges[key]):
            raise DistillationConfigError(f"{key}={value} is out of range: it must be {ranges[key].text} "
                                          f"(default: {shown}).")


def check_train_values(args: dict[str, Any]) -> None:
    """The kind and range of every train argument given, before anything is built: Ultralytics' `check_cfg` for its
    keys (its TypeError, e.g. `lr0=abc`, would otherwise end in a traceback), `check_kd_values` for yolokd's."""
    from ultralytics.cfg import check_cfg

    ultra, kd = split_kd_args(args)
    try:
        check_cfg(dict(ultra))  # a copy: Ultralytics converts in place, and converts again when the run starts
    except (TypeError, ValueError) as e:
        raise DistillationConfigError((str(e).strip().splitlines() or [type(e).__name__])[0]) from None
    check_kd_values(kd)


CRITERION_KEYS = frozenset({"fade", "grad_ratio"})  # keys of a method's YAML the criterion reads, not the method:
# its fade (`method_fade`) and its gradient-share cap (`run_grad_ratio`)


def _getter(args: dict[str, Any] | Any):
    return args.get if isinstance(args, dict) else lambda k, d: getattr(args, k, d)


def method_hparams(method: str, args: dict[str, Any] | Any) -> dict[str, Any]:
    """The un-prefixed hyper-parameters of `method` read from train arguments (dict or namespace): the keys of its
    YAML that its constructor takes, i.e. all but the `CRITERION_KEYS`."""
    get = _getter(args)
    return {k: get(f"{method}_{k}", v) for k, v in method_defaults(method).items() if k not in CRITERION_KEYS}


def _own(method: str, key: str, args: dict[str, Any] | Any) -> float:
    """A criterion key of `method` (`CRITERION_KEYS`): its `<method>_<key>` argument, else its YAML's value, else 0."""
    return float(_getter(args)(f"{method}_{key}", method_defaults(method).get(key)) or 0.0)


def method_fade(method: str, args: dict[str, Any] | Any) -> float:
    """The fade of `method`'s capped terms (`schedule_factor`): `kd_fade` where it is given, for every method of the
    run; else the method's own `<method>_fade` (a key of its YAML, e.g. rmpfi's 0.5); else 0, no fade."""
    fade = _getter(args)("kd_fade", None)
    return _own(method, "fade", args) if fade is None else float(fade)


def run_grad_ratio(capped_methods: list[str], args: dict[str, Any] | Any) -> float:
    """The run's gradient-share cap (`GradientShareCap`; 0 = off): `kd_grad_ratio` where it is given, for every
    method; else the smallest own `<method>_grad_ratio` (a key of its YAML, e.g. pdf's) over the run's methods with
    capped terms, 0 for one that has none: one cap acts on all capped terms, so it acts only where each of their
    methods asks for it (`pdf+ld` is capped as `pdf` is, `ld` being task-scaled; `pdf+dfd` is not)."""
    ratio = _getter(args)("kd_grad_ratio", None)
    if ratio is None:
        return min((_own(m, "grad_ratio", args) for m in capped_methods), default=0.0)
    return float(ratio)


def parse_kv(argv: list[str]) -> dict[str, Any]:
    """`["epochs=3", "imgsz", "=", "128"]` -> `{"epochs": 3, "imgsz": 128}` with Ultralytics' own parsing."""
    from ultralytics.cfg import merge_equals_args, parse_key_value_pair

    out = {}
    for a in merge_equals_args(argv):
        if "=" not in a:
            raise SyntaxError(f"'{a}' is not a key=value argument (e.g. epochs=10)")
        try:
            k, v = parse_key_value_pair(a)
        except AssertionError:  # Ultralytics asserts that the value is not empty
            raise SyntaxError(f"'{a}' has no value: give one after '=' (e.g. epochs=10)") from None
        out[k] = v
    return out


def closest(name: str, choices: list[str]) -> str:
    """A 'did you mean ...' hint for an unknown name ('' when nothing is close)."""
    near = get_close_matches(name, choices, n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
