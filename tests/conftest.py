"""Test environment: offline, no auto-install, a private Ultralytics config dir and dataset cache.

Set before anything imports Ultralytics (pytest imports conftest first). The empty Arial.ttf stops Ultralytics'
font check from trying a download.
"""

import os
import tempfile
from pathlib import Path

_ROOT = Path(tempfile.mkdtemp(prefix="yolokd-tests-"))
(_ROOT / "config").mkdir()
(_ROOT / "config" / "Arial.ttf").write_bytes(b"")
os.environ.update(
    YOLO_OFFLINE="1",
    YOLO_AUTOINSTALL="False",
    YOLO_CONFIG_DIR=str(_ROOT / "config"),
    YOLOKD_CACHE=str(_ROOT / "cache"),
)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data() -> str:
    """Data yaml of the tiny synthetic set (48 train / 16 val images, 128 px, 6 classes), generated once."""
    from yolokd.data.synthetic import resolve_data

    return resolve_data("synthetic-tiny")


@pytest.fixture(scope="session")
def train_kwargs(tmp_path_factory) -> dict:
    """Ultralytics arguments for a quick CPU run; each test adds model/teacher/method/name."""
    return dict(epochs=1, imgsz=64, batch=8, plots=False, workers=0, device="cpu", val=True,
                project=str(tmp_path_factory.mktemp("runs")), exist_ok=True, verbose=False)
