"""The `yolokd` command: help texts, method listing, key=value parsing, unknown names."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import yolokd
from yolokd.cli import ALIASES, COMMANDS, main
from yolokd.config import kd_defaults, method_cfg_names, parse_kv
from yolokd.methods import get_method, list_methods


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "methods", "crops", "export", "gains", "latency", "overhead", "bench", "benchmark"):
        assert f"  {cmd} " in out
    assert "  bench      old name of `gains`" in out and "  benchmark  old name of `latency`" in out


def test_top_level_help_loads_neither_torch_nor_ultralytics():
    code = ("import sys; from yolokd.cli import main; main(['--help']); "
            "print(sorted(m for m in ('torch', 'ultralytics') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")


@pytest.mark.parametrize("command", [*COMMANDS, *ALIASES])
@pytest.mark.parametrize("word", ["help", "--help"])
def test_every_subcommand_has_help(command, word, capsys):
    assert main([command, word]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) >= 1 and f"yolokd {ALIASES.get(command, command)}" in out


@pytest.mark.parametrize("command", ["train", "methods", "gains", "bench", "latency", "overhead", "crops", "export",
                                     "explain"])
def test_every_subcommand_refuses_a_misspelt_key_in_one_line(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [command, "nonsense_key=1"]
    if command == "train":
        argv += ["model=yolov8n.yaml", "data=synthetic-tiny"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"yolokd {command}: error: "), err
    assert not any(tmp_path.iterdir())  # nothing written


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
    starts = {line.index(line.split(maxsplit=1)[1]) for line in out.splitlines() if line and not line.startswith(" ")}
    assert len(starts) == 1  # the summaries line up, after the longest name ("ultralytics")


def test_unknown_command_suggests_nearest(capsys):
    assert main(["trian"]) == 2
    assert "Did you mean 'train'" in capsys.readouterr().err


def test_parse_kv_uses_ultralytics_parsing():
    assert parse_kv(["epochs=3", "imgsz", "=", "128", "method=pgd+rm", "amp=False", "lr0=1e-3"]) == {
        "epochs": 3, "imgsz": 128, "method": "pgd+rm", "amp": False, "lr0": 1e-3}
    with pytest.raises(SyntaxError, match="key=value"):
        parse_kv(["epochs"])
    with pytest.raises(SyntaxError, match="'epochs=' has no value"):  # Ultralytics asserts; we say it in one line
        parse_kv(["epochs="])


def test_a_source_checkout_reads_its_own_yamls_not_the_installed_ones(tmp_path):
    """A second checkout run with PYTHONPATH (a benchmark clone) must not read the editable install's cfg/."""
    repo = Path(yolokd.__file__).resolve().parents[1]
    clone = tmp_path / "clone"
    shutil.copytree(repo / "yolokd", clone / "yolokd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "cfg", clone / "cfg")
    shutil.copy(repo / "pyproject.toml", clone / "pyproject.toml")
    rm_yaml = clone / "cfg" / "methods" / "rm.yaml"
    rm_yaml.write_text(rm_yaml.read_text() + "\nclone_only_key: 1\n")
    code = "from yolokd.config import cfg_dir, kd_defaults; print(cfg_dir()); print('rm_clone_only_key' in kd_defaults())"
    env = {**os.environ, "PYTHONPATH": str(clone)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=tmp_path).stdout.split()
    assert out == [str(clone / "cfg"), "True"]


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
