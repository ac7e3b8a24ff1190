"""Step-time overhead of distillation: `yolokd overhead`.

Times, in one process and on one batch: the plain student training step, the teacher's no-grad forward, and the
distillation step of each method (student step + teacher forward + KD terms + adapters), then prints
`overhead = step_kd / (step_student + forward_teacher)`. 1.0 means the KD terms cost nothing beyond running both
models; the goal is <= 1.10. Figures are medians over `iters` timed steps after `warmup` untimed ones.

    yolokd overhead model=yolov8n.yaml teacher=yolov8s.yaml imgsz=160 batch=16 iters=5
    yolokd overhead model=student.pt teacher=teacher.pt cls_teacher=classifier.pt   # trained models, with dicod
    yolokd overhead methods=dfd,pgd+ld dfd_hidden_cap=64 threads=1                   # any yolokd train argument
    yolokd overhead model=student.pt teacher=teacher.pt imgsz=640 device=0           # on a GPU (float32, no AMP)
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from ultralytics.cfg import get_cfg
from ultralytics.utils import LOGGER
from ultralytics.utils.torch_utils import select_device

from yolokd.bench.latency import time_calls
from yolokd.checks import freeze, load_detector
from yolokd.config import full_defaults
from yolokd.criterion import build_distillation
from yolokd.methods.base import get_method, list_methods, parse_methods
from yolokd.taps import raw_forward


def random_batch(batch: int, imgsz: int, nc: int, objects: int = 4, seed: int = 0) -> dict:
    """A detection batch in Ultralytics' format: random images, `objects` random boxes per image."""
    g = torch.Generator().manual_seed(seed)
    n = batch * objects
    wh = 0.05 + 0.3 * torch.rand(n, 2, generator=g)
    xy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)
    return {
        "img": torch.rand(batch, 3, imgsz, imgsz, generator=g),
        "cls": torch.randint(0, nc, (n, 1), generator=g).float(),
        "bboxes": torch.cat([xy, wh], 1),
        "batch_idx": torch.arange(batch).repeat_interleave(objects).float(),
    }


def median_time(fn: Callable[[], None], iters: int, warmup: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of `fn` in milliseconds (`yolokd latency`'s timer: `sync` waits for queued device work
    before each clock read, since CUDA runs asynchronously)."""
    return statistics.median(time_calls(fn, warmup, iters, sync))


def measure(model: str, teacher: str, methods: list[str], imgsz: int = 160, batch: int = 16, iters: int = 5,
            warmup: int = 2, nc: int = 6, device: str = "cpu", **kd_args) -> dict[str, float]:
    """Milliseconds per step: 'student', 'teacher', and one entry per method (see module docstring).

    `device`: Ultralytics' `device=` ("cpu", "0", ...), where both models, the adapters and the batch run.
    `kd_args`: yolokd train arguments for the methods (e.g. cls_teacher= for dicod, dfd_alpha=...)."""
    dev = select_device(device, verbose=False)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t_model = freeze(load_detector(teacher, "teacher", nc=nc).float().to(dev))
    nc = len(t_model.names)  # a .pt teacher brings its own class count
    data = {k: v.to(dev) for k, v in random_batch(batch, imgsz, nc).items()}
    args = get_cfg({**full_defaults(), **kd_args})

    def student_and_optimizer():
        torch.manual_seed(0)
        s = load_detector(model, "student", nc=nc).float().to(dev)  # a .yaml (random init) or a trained .pt
        s.args = args
        s.train().requires_grad_(True)
        return s, torch.optim.SGD(s.parameters(), lr=1e-3, momentum=0.9)

    def step(s, opt, params):
        opt.zero_grad()
        loss, _ = s.loss(data)
        loss.sum().backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()

    def plain_step_time() -> float:
        s, opt = student_and_optimizer()
        params = list(s.parameters())
        return median_time(lambda: step(s, opt, params), iters, warmup, sync)

    out = {"student": plain_step_time()}
    out["teacher"] = median_time(lambda: torch.no_grad()(raw_forward)(t_model, data["img"]), iters, warmup, sync)
    for name in methods:  # a method or a composition ("dfd+ld")
        s, opt = student_and_optimizer()
        loss = build_distillation(parse_methods(name), s, t_model, args).install(s)  # the trainer's wiring
        kd = loss.methods
        opt.add_param_group({"params": [p for p in kd.parameters() if p.requires_grad]})
        params = list(s.parameters()) + list(kd.parameters())
        out[name] = median_time(lambda: step(s, opt, params), iters, warmup, sync)
        loss.remove()
    # The first timing of a fresh process runs slower (allocator and kernel caches still cold), which made every
    # method look cheaper than free: time the plain step again now and keep the faster of the two.
    out["student"] = min(out["student"], plain_step_time())
    return out


def report(times: dict[str, float]) -> str:
    """The table printed by `yolokd overhead`."""
    base = times["student"] + times["teacher"]
    lines = [f"student step {times['student']:.1f} ms | teacher forward {times['teacher']:.1f} ms | sum {base:.1f} ms",
             f"{'method':<12}{'kd step ms':>12}{'overhead':>10}"]
    lines += [f"{k:<12}{v:>12.1f}{v / base:>10.3f}" for k, v in times.items() if k not in {"student", "teacher"}]
    return "\n".join(lines)


OWN_KEYS = ("model", "teacher", "methods", "imgsz", "batch", "iters", "warmup", "threads", "nc", "device")


def cmd_overhead(argv: list[str]) -> int:
    """`yolokd overhead model= teacher= methods=a,b imgsz= batch= iters= warmup= threads= device=` (+ yolokd train
    keys)."""
    from yolokd.config import DistillationConfigError, check_number, closest, kd_defaults, parse_kv

    a = parse_kv(argv)
    valid = [*OWN_KEYS, *kd_defaults()]
    for key in a:
        if key not in valid:
            raise DistillationConfigError(f"'{key}' is not an argument of `yolokd overhead`.{closest(key, valid)} Its "
                                          f"own: {', '.join(OWN_KEYS)}; any yolokd train argument (e.g. dfd_alpha=).")
    runnable = [m for m in list_methods() if not getattr(get_method(m), "delegated", False)]
    methods = a.pop("methods", ",".join(m for m in runnable if m != "dicod" or a.get("cls_teacher")))
    methods = methods.split(",") if isinstance(methods, str) else list(methods)
    for m in methods:  # refused before anything is timed
        parse_methods(m)
    counts = {"imgsz": ">= 32", "batch": ">= 1", "iters": ">= 1", "warmup": ">= 0", "threads": ">= 1", "nc": ">= 1"}
    a.update({k: check_number(k, a[k], int, allowed) for k, allowed in counts.items() if k in a})
    torch.set_num_threads(a.pop("threads", torch.get_num_threads()))
    a["device"] = str(a.get("device", "cpu"))  # `device=0` arrives as an int
    times = measure(a.pop("model", "yolov8n.yaml"), a.pop("teacher", "yolov8s.yaml"), methods, **a)
    LOGGER.info(f"threads={torch.get_num_threads()}\n" + report(times))
    return 0
