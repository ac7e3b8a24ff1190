"""The `yolokd` command: help texts, method listing, key=value parsing, unknown names."""

import pytest

from yolokd.cli import main
from yolokd.config import parse_kv
from yolokd.config import kd_defaults, method_cfg_names
from yolokd.methods import get_method, list_methods


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "methods", "crops", "export", "benchmark", "bench", "overhead"):
        assert f"  {cmd} " in out


def test_train_help_shows_yolokd_arguments_with_defaults(capsys):
    assert main(["train", "help"]) == 0
    out = capsys.readouterr().out
    assert "teacher:" in out and "method:" in out and "cls_teacher:" in out
    assert "dfd_alpha: 2.8e-5" in out and "pgd_topk: 30" in out


def test_methods_lists_each_registered_method_once(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    lines = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]
    assert sorted(lines) == list_methods()
    assert {"fitnet", "dfd", "pdf", "rm", "pfi", "rmpfi", "pgd", "dicod", "ultralytics"} <= set(lines)
    assert "dfd_alpha=2.8e-05" in out


def test_every_method_cfg_matches_its_constructor():
    """Each YAML key is a keyword of the method (a stray or missing key would fail at build time)."""
    import inspect

    for name in method_cfg_names():
        params = inspect.signature(get_method(name).__init__).parameters
        keyword_only = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
        from yolokd.config import method_defaults

        assert set(method_defaults(name)) <= keyword_only, name
    from yolokd.config import kd_base_defaults

    method_keys = set(kd_defaults()) - set(kd_base_defaults())
    assert all(k.split("_")[0] in method_cfg_names() for k in method_keys)


def test_unknown_command_suggests_nearest(capsys):
    assert main(["trian"]) == 2
    assert "Did you mean 'train'" in capsys.readouterr().err


def test_parse_kv_uses_ultralytics_parsing():
    assert parse_kv(["epochs=3", "imgsz", "=", "128", "method=pgd+rm", "amp=False", "lr0=1e-3"]) == {
        "epochs": 3, "imgsz": 128, "method": "pgd+rm", "amp": False, "lr0": 1e-3}
    with pytest.raises(SyntaxError, match="key=value"):
        parse_kv(["epochs"])


def test_example_configs_use_valid_keys():
    from ultralytics.utils import YAML

    from yolokd.config import cfg_dir, full_defaults

    examples = sorted((cfg_dir() / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        cfg = YAML.load(path)
        assert set(cfg) <= set(full_defaults()), path
        from yolokd.methods import parse_methods

        parse_methods(cfg["method"])
