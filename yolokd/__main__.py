"""`python -m yolokd ...`: the `yolokd` command."""

from yolokd.cli import entrypoint

entrypoint()
