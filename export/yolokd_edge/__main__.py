"""`python -m yolokd_edge MODEL.onnx source=... [key=value ...]`."""

import sys

from yolokd_edge.cli import main

sys.exit(main())
