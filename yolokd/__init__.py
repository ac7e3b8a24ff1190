"""yolokd: knowledge distillation for Ultralytics YOLO detectors (v8, 11, 26).

A frozen teacher and the student see the same augmented batch; distillation terms from published methods are
added to the student's loss; the student leaves as a plain Ultralytics checkpoint.
"""

__version__ = "0.1.0"
__all__ = ["DistillationTrainer", "__version__"]


def __getattr__(name):
    if name == "DistillationTrainer":  # imported lazily: `import yolokd` stays cheap for the CLI's --help
        from yolokd.trainer import DistillationTrainer

        return DistillationTrainer
    raise AttributeError(name)
