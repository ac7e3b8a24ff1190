"""DDP: the adapters (DFD's transform, aligners) are the same on every rank from the first step to the last.

Two processes on the gloo backend, on the CPU, each a rank with its own seed and its own data (as Ultralytics runs
DDP), driving the trainer's own hooks: `sync_adapters` (what `_setup_train` calls after setup and resume) and
`optimizer_step` (adapter gradients averaged over the ranks, clipped with the student's, then the step).
"""

from __future__ import annotations

import gc
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def same_on_every_rank(x: torch.Tensor) -> bool:
    gathered = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(gathered, x)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def rank_main(rank: int, init_file: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from yolokd.config import kd_defaults
    from yolokd.criterion import build_distillation
    from yolokd.trainer import DistillationTrainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = DetectionModel("yolov8s.yaml", nc=3, verbose=False).eval().requires_grad_(False)
    student = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    student.args = get_cfg()
    torch.manual_seed(1 + rank)  # Ultralytics seeds each rank differently before the adapters are built
    args = SimpleNamespace(**{**kd_defaults(), "method": "dfd"})
    trainer = DistillationTrainer.__new__(DistillationTrainer)  # the hooks under test, without a dataset
    trainer.world_size, trainer.device, trainer.ema = WORLD, torch.device("cpu"), None
    trainer.distillation = build_distillation(["dfd"], student, teacher, args)
    report = {"differ_before_sync": not same_on_every_rank(flat(trainer.kd_methods))}
    trainer.sync_adapters()
    report["same_after_sync"] = same_on_every_rank(flat(trainer.kd_methods))
    start = flat(trainer.kd_methods).clone()

    trainer.distillation.install(student)
    trainer.model = DDP(student, find_unused_parameters=True)
    adapters = [p for p in trainer.kd_methods.parameters() if p.requires_grad]
    trainer.optimizer = torch.optim.SGD([*student.parameters(), *adapters], lr=0.05, momentum=0.9)
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(100 + rank)  # every rank its own images and boxes
    student.train()
    for _ in range(STEPS):
        batch = {"img": torch.rand(2, 3, 64, 64, generator=g), "batch_idx": torch.tensor([0.0, 1.0]),
                 "cls": torch.randint(0, 3, (2, 1), generator=g).float(),
                 "bboxes": torch.rand(2, 4, generator=g) * 0.4 + 0.3}
        loss, _ = trainer.model(batch)
        loss.sum().backward()
        trainer.optimizer_step()
    report["moved"] = not torch.equal(start, flat(trainer.kd_methods))
    report["same_after_steps"] = same_on_every_rank(flat(trainer.kd_methods))
    report["student_same"] = same_on_every_rank(flat(student))
    torch.save(report, f"{out_dir}/rank{rank}.pt")
    # DDP's reducer holds the process group: release it while the interpreter is whole, not at its exit, where a
    # gloo rank once aborted ("terminate called without an active exception") in CI.
    dist.barrier()
    del trainer, adapters
    gc.collect()
    dist.destroy_process_group()


def test_adapters_stay_identical_across_ranks(tmp_path):
    mp.spawn(rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["differ_before_sync"], "each rank built different adapters: the test would prove nothing"
        assert r["same_after_sync"] and r["moved"] and r["same_after_steps"] and r["student_same"], r


def test_adapter_gradients_are_clipped_to_their_own_norm_and_the_students_clip_is_unchanged():
    from yolokd.trainer import DistillationTrainer

    student, adapter = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    trainer = DistillationTrainer.__new__(DistillationTrainer)
    trainer.world_size, trainer.device, trainer.ema, trainer.model = 1, torch.device("cpu"), None, student
    trainer.distillation = SimpleNamespace(methods=adapter)
    trainer.optimizer = torch.optim.SGD([*student.parameters(), *adapter.parameters()], lr=0.0)
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    for p in student.parameters():
        p.grad = torch.full_like(p, 0.1)  # norm 0.2 * sqrt(5): below 10, left alone
    for p in adapter.parameters():
        p.grad = torch.full_like(p, 100.0)  # norm 200 * sqrt(5): clipped to 10
    grads = {}
    trainer.optimizer.zero_grad = lambda: grads.update(
        student=torch.cat([p.grad.flatten() for p in student.parameters()]),
        adapter=torch.cat([p.grad.flatten() for p in adapter.parameters()]))
    trainer.optimizer_step()
    assert torch.allclose(grads["student"], torch.full((20,), 0.1))
    assert torch.isclose(grads["adapter"].norm(), torch.tensor(10.0), rtol=1e-4)
