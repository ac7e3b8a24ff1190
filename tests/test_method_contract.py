"""The method contract over the registry: `cfg/methods/<name>.yaml` is the only place a method's defaults live."""

from __future__ import annotations

import inspect

import pytest

from yolokd.config import CRITERION_KEYS, method_defaults
from yolokd.methods.base import get_method, list_methods

BUILT_HERE = [n for n in list_methods() if not getattr(get_method(n), "delegated", False)]


@pytest.mark.parametrize("name", BUILT_HERE)
def test_constructor_takes_the_yaml_keys_with_no_defaults_of_its_own(name):
    # A default in the constructor would make a method built in Python differ from the same method on the command
    # line the day the YAML changes; every hyper-parameter is a required keyword, named as in the YAML.
    cls = get_method(name)
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]  # after self, student, teacher
    keywords = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    assert all(p.default is p.empty for p in params), [p.name for p in params if p.default is not p.empty]
    own = set(method_defaults(name)) - CRITERION_KEYS  # a criterion key (rmpfi's fade) is not the method's
    if any(p.kind is p.VAR_KEYWORD for p in params):  # rmpfi: the rm_* and pfi_* keys, all declared in uses_args
        assert set(cls.uses_args) and not own
    else:
        assert keywords == own | set(cls.uses_args)


def test_every_numeric_argument_declares_its_range_next_to_its_default():
    from yolokd.config import declared_ranges, kd_defaults

    numeric = {k for k, v in kd_defaults().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    ranges = declared_ranges()
    own = {"kd_fade", "kd_grad_ratio"}  # numbers, empty by default (each method's own fade, its own cap)
    assert numeric | own == set(ranges)
    assert all(kd_defaults()[k] in r for k, r in ranges.items() if k not in own)  # every default in its range
