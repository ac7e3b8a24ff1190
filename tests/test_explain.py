"""`yolokd explain` and the training plots (yolokd/explain.py): the recorded maps are the tensors each method's loss
used (the terms recomputed by hand from them equal the step's loss items), the figure draws them, every method and a
composition work on YOLOv8 and YOLO26 students, bad input is one line with nothing written, and with `plots=True`
training writes the figures, kd_results.png and the kd_agree column, while with `plots=False` none of that code runs.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import read_results, save_checkpoint
from yolokd import explain as ex
from yolokd.cli import main
from yolokd.criterion import build_distillation, kd_agreement
from yolokd.data.synthetic import SYNTHETIC_NAMES
from yolokd.methods._common import feature_gaps, level_mean, split_levels
from yolokd.methods.dfd import disparity, split_disparity
from yolokd.methods.dicod import classifier_logits, kd_cls_loss
from yolokd.methods.ld import edge_kl
from yolokd.methods.pgd import channel_attention, spatial_attention
from yolokd.methods.rm import group_log_softmax

ALL = ["fitnet", "dfd", "pdf", "rm", "pfi", "rmpfi", "pgd", "dicod", "ld"]
BATCH = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
         "cls": torch.tensor([[0.0], [2.0], [1.0]]),
         "bboxes": torch.tensor([[0.3, 0.3, 0.4, 0.3], [0.7, 0.6, 0.3, 0.5], [0.5, 0.5, 0.6, 0.6]])}


@pytest.fixture(scope="module")
def cls_pt(tmp_path_factory) -> Path:
    """A random yolov8n-cls classifier with the synthetic set's class names (DICOD's teacher)."""
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("explain") / "cls.pt", "yolov8n-cls.yaml", SYNTHETIC_NAMES)


# ---------------------------------------------------------------------------------------------- the records
def models(cfg: str, cls_pt: Path, **args):
    """A random `cfg` student (nc 6), a random yolov8s teacher and their distillation with every method."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from yolokd.config import kd_defaults

    torch.manual_seed(0)
    student = DetectionModel(cfg, nc=6, verbose=False)
    student.args = get_cfg()
    teacher = DetectionModel("yolov8s.yaml", nc=6, verbose=False).eval()
    args = SimpleNamespace(**{**kd_defaults(), "cls_teacher": str(cls_pt), "data": SYNTHETIC_NAMES, **args})
    return student, teacher, build_distillation(ALL, student, teacher, args)


def spy(calls: list, f, result: bool = False):
    """`f`, which also appends each call's arguments (`result`: its result) to `calls`."""
    def wrapped(*args):
        out = f(*args)
        calls.append(out if result else args)
        return out
    return wrapped


class Step(SimpleNamespace):
    """What one criterion step with every method saw: its loss items, the records, the features the methods got,
    the assignment, the methods, and what `pgd`'s term functions received."""


def recorded_step(cfg: str, cls_pt: Path) -> Step:
    import yolokd.methods.pgd as pgd

    student, teacher, crit = models(cfg, cls_pt, kd_max_ratio=0.0)  # uncapped: the items are the methods' terms
    crit.install(student)
    features, pgd_args = [], []
    for taps in (crit.student_taps, crit.teacher_taps):  # keep the features the criterion hands the methods
        taps.collect = spy(features, taps.collect, result=True)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("cls_level_terms", "reg_level_terms"):
            mp.setattr(pgd, name, spy(pgd_args, getattr(pgd, name)))
        student.train()
        with crit.methods.recording() as records:
            _, items = crit(student(BATCH["img"]), BATCH)
    t, s = features  # the teacher's forward runs first
    return Step(items=items, records=records["one2many"], s=s, t=t, a=crit.assignment.last,
                methods=crit.methods.methods, pgd_args=pgd_args)


@pytest.fixture(scope="module", params=["yolov8n.yaml", "yolo26n.yaml"])
def step(request, cls_pt) -> Step:
    return recorded_step(request.param, cls_pt)


def hand_fitnet(rec, s, t, m, a):
    for e, al, xs, xt in zip(rec["hint_error"], m.align, s.neck, t.neck):
        assert torch.equal(e, (al(xs) - xt).pow(2))
    return {"ht": m.weight * torch.stack([e.mean() for e in rec["hint_error"]]).mean()}


def hand_dfd(rec, s, t, m, a):
    h, w = BATCH["img"].shape[-2:]
    scale = m.ref_area / (h * w) / t.neck[0].shape[0]
    hd_sum = ld_sum = 0.0
    for d, hd, al, f, fs, ft in zip(rec["disparity"], rec["hd_mask"], m.align, m.transform, s.neck, t.neck):
        assert torch.equal(d, disparity(ft, al(fs))) and torch.equal(hd[:, 0], split_disparity(d))
        hd_sum = hd_sum + ((ft - f(fs)).pow(2) * hd).sum()
        ld_sum = ld_sum + ((ft - al(fs)).pow(2) * ~hd).sum()
    return {"hd": m.alpha * scale * hd_sum, "ld": m.beta * scale * ld_sum}


def hand_pdf(rec, s, t, m, a):
    assert all(torch.allclose(w.mean(1), torch.ones(2)) for w in rec["weight"])  # Eq. 2: mean 1 per map
    return {"pdf": m.weight * level_mean([w * g for w, g in zip(rec["weight"], feature_gaps(m.align, s.neck, t.neck))])}


def hand_pfi(rec, s, t, m, a):
    gaps = feature_gaps(m.align, s.neck, t.neck)
    return {"pfi": m.weight * level_mean([w * g for w, g in zip(split_levels(rec["weight"][0], s.neck), gaps)])}


def hand_rm(rec, s, t, m, a):
    b, anc, gt, group = rec["candidates"]
    (rank_t, rank_s), (kl_cls, kl_loc) = rec["rank"], rec["kl"]
    n, cls = len(kl_cls), a.gt_labels[b, gt, 0].long()
    for scores, rank in ((t.scores, rank_t), (s.scores, rank_s)):  # Eq. 5 from the features
        z = scores[b, cls, anc].sigmoid() if m.scores == "prob" else scores[b, cls, anc]
        assert torch.allclose(rank, group_log_softmax(z / m.temperature, group, n))
    for g in range(n):  # Eq. 6 per object, by hand
        p, q = rank_t[group == g].exp(), rank_s[group == g].exp()
        assert torch.isclose(kl_cls[g], (p * (p.log() - q.log())).sum(), atol=1e-6)
    valid = (torch.bincount(group) >= 2).sum()
    return {"cls": m.weight * kl_cls.sum() / valid, "loc": m.weight * m.loc_weight * kl_loc.sum() / valid}


def hand_rmpfi(rec, s, t, m, a):
    return {**hand_rm(rec, s, t, m.rm, a), "pfi": hand_pfi(rec, s, t, m.pfi, a)["pfi"]}


def hand_pgd(rec, s, t, m, a, args):
    cls = reg = 0.0
    for l, (fg_args, reg_args) in enumerate(zip(args[0::2], args[1::2])):
        assert fg_args[2] is rec["cls_mask"][l] and fg_args[3] is rec["bg_mask"][l]  # the very tensors
        assert reg_args[2] is rec["reg_mask"][l]
        fs, ft = m.align_cls[l](s.cls_feat[l]), t.cls_feat[l]
        err = (spatial_attention(ft, m.tau)[:, None] * channel_attention(ft, m.tau) * (ft - fs).pow(2)).sum(1)
        fg_bg = m.alpha * (err * rec["cls_mask"][l]).sum() + m.beta * (err * rec["bg_mask"][l]).sum()
        cls = cls + (1 + m.level_gain * l) * fg_bg / 2
        fs, ft, imp = m.align_box[l](s.box_feat[l]), t.box_feat[l], rec["reg_mask"][l]
        reg = reg + m.gamma * ((channel_attention(ft, m.tau) * (ft - fs).pow(2)).mean(1) * imp).sum() / (
            (imp > 0).sum().clamp(min=1))
    return {"cls": cls, "reg": reg}


def hand_dicod(rec, s, t, m, a):
    crops, logits = torch.cat(rec["crops"]), rec["logits"][0]
    assert torch.allclose(classifier_logits(m.classifier, crops)[:, m.perm], logits, atol=1e-5)
    b, anc = a.fg_mask.nonzero(as_tuple=True)
    keys, inv = (b * a.gt_bboxes.shape[1] + a.target_gt_idx[b, anc]).unique(return_inverse=True)
    assert torch.equal(rec["image"][0], keys // a.gt_bboxes.shape[1])
    return {"cls": m.cls_weight * kd_cls_loss(s.scores[b, :, anc], logits[inv], m.temperature)}


def hand_ld(rec, s, t, m, a):
    w = rec["confidence"][0]
    assert torch.equal(w, t.scores.sigmoid().amax(1))
    b, _, n = s.scores.shape
    reg_max = s.boxes.shape[1] // 4
    per_edge = (edge_kl(t.boxes.view(b, 4, reg_max, n), s.boxes.view(b, 4, reg_max, n), m.tau) if reg_max > 1
                else (t.dfl(t.boxes) - s.dfl(s.boxes)).abs())
    return {"box": m.box_weight * (per_edge.mean(1) * w).sum() / w.sum().clamp_min(1)}


@pytest.mark.parametrize("method", ALL)
def test_recorded_maps_give_back_the_terms_of_the_step(step, method):
    # the recorded tensors, multiplied into the loss by hand, give the very terms the criterion logged for the step
    hand = globals()[f"hand_{method}"]
    args = (step.pgd_args,) if method == "pgd" else ()
    for term, value in hand(step.records[method], step.s, step.t, step.methods[method], step.a, *args).items():
        column = method if term == method else f"{method}_{term}"
        assert torch.allclose(value, step.items[column], rtol=1e-5, atol=1e-8), (column, value, step.items[column])


def test_recording_is_off_after_the_block(step):
    assert all(m._sink is None for m in step.methods.values()) and step.methods["rmpfi"].rm._sink is None


# ---------------------------------------------------------------------------------------------- the figure
def test_the_figure_draws_the_recorded_maps(cls_pt, tiny_data, tmp_path, monkeypatch):
    student, teacher, crit = models("yolov8n.yaml", cls_pt)
    pictures = ex.letterbox(ex.val_images({"val": str(Path(tiny_data).parent / "images" / "val")}, 1), 64, 6)
    explained = ex.explain(crit, student, teacher, pictures)
    drawn = []
    monkeypatch.setattr(ex, "overlay", spy(drawn, ex.overlay))
    path = ex.draw(explained, 0, tmp_path / "figure.png", dpi=40)
    assert path.is_file() and pictures[0].gt == "labels" and len(pictures[0].boxes)
    shapes = [(64 // s, 64 // s) for s in (8, 16, 32)]
    rows = [(m, r) for m in ALL for r in ex.ROWS[m] if isinstance(r, ex.MapRow)]
    expected = [g for m, r in rows for g in ex.level_maps(explained.records["one2many"][m][r.key], shapes, 0)]
    assert len(drawn) == len(expected) and all(np.array_equal(grid, e) for (_, grid, _), e in zip(drawn, expected))


def test_level_maps_split_all_level_records_and_keep_per_level_ones():
    shapes = [(2, 2), (1, 1)]
    flat = torch.arange(10.0).view(2, 5)  # (B, A) over both levels
    assert [m.tolist() for m in ex.level_maps([flat], shapes, 1)] == [[[5, 6], [7, 8]], [[9]]]
    per_level = [torch.ones(2, 3, 2, 2), torch.zeros(2, 1, 1, 1, dtype=torch.bool)]  # (B, C, H, W): channel mean
    assert [m.tolist() for m in ex.level_maps(per_level, shapes, 0)] == [[[1, 1], [1, 1]], [[0]]]


# ---------------------------------------------------------------------------------------------- the command
def explain_cli(tmp_path, *argv) -> tuple[int, list[Path]]:
    out = tmp_path / "out"
    rc = main(["explain", *argv, f"out={out}", "imgsz=64", "n=1", "dpi=40"])
    return rc, sorted(out.glob("*.png"))


@pytest.mark.parametrize("method", ALL)
def test_explain_every_method(method, cls_pt, tiny_data, tmp_path):
    teacher = [] if method == "dicod" else ["teacher=yolov8s.yaml"]
    rc, pngs = explain_cli(tmp_path, "model=yolov8n.yaml", *teacher, f"method={method}", f"cls_teacher={cls_pt}",
                           f"data={tiny_data}")
    assert rc == 0 and len(pngs) == 1


@pytest.mark.parametrize("student", ["yolov8n.yaml", "yolo26n.yaml"])
def test_explain_a_composition_of_every_method(student, cls_pt, tiny_data, tmp_path, capsys):
    rc, pngs = explain_cli(tmp_path, f"model={student}", "teacher=yolov8s.yaml", f"method={'+'.join(ALL)}",
                           f"cls_teacher={cls_pt}", f"data={tiny_data}")
    assert rc == 0 and len(pngs) == 1
    assert "pgd_cls=" in capsys.readouterr().out


def test_explain_a_source_folder_without_labels_uses_the_teacher(tiny_data, tmp_path, capsys):
    import shutil

    images = tmp_path / "imgs"
    images.mkdir()
    for f in sorted((Path(tiny_data).parent / "images" / "val").iterdir())[:2]:
        shutil.copy(f, images / f.name)  # no labels/ folder beside: the teacher's detections stand in
    rc, pngs = explain_cli(tmp_path, "model=yolov8n.yaml", "teacher=yolov8n.yaml", "method=pgd+rm",
                           f"source={images}", f"data={tiny_data}", "conf=0.0")
    assert rc == 0 and [p.name for p in pngs] == sorted(f"{f.stem}_pgd+rm.png" for f in images.iterdir())


@pytest.mark.parametrize("argv, words", [
    (["teacher=yolov8s.yaml", "source=missing.png"], "no such image or folder"),
    (["teacher=yolov8s.yaml", "source={empty}"], "is a folder with no images"),
    (["method=pgd"], "method=pgd needs a teacher detector: add teacher="),
    (["teacher=yolov8s.yaml", "method=pgdd"], "Unknown distillation method 'pgdd'. Did you mean 'pgd'"),
    (["teacher=yolov8s.yaml", "method=ultralytics"], "method=ultralytics runs inside Ultralytics"),
    (["teachr=yolov8s.yaml"], "'teachr' is not an explain argument. Did you mean 'teacher'"),
    (["teacher=yolov8s.yaml", "n=0"], "n=0 must be a whole number >= 1."),
    (["teacher=yolov8s.yaml", "n=abc"], "n=abc must be a whole number >= 1."),
    (["teacher=yolov8s.yaml", "conf=2"], "conf=2 must be a number in [0, 1]."),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, words, tiny_data, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no image here")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv = [a.format(empty=empty) for a in argv]
    assert main(["explain", "model=yolov8n.yaml", f"data={tiny_data}", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("yolokd explain: error: ") and words in err, err
    assert not any(cwd.iterdir())


# ---------------------------------------------------------------------------------------------- gradient share
def test_gradient_share_hand_values():
    """Task terms a1.p + a2.p (gradient (2, 0)) against a KD term b.p: |b| / 2 and the cosine of b with (1, 0)."""
    p = torch.zeros(2, requires_grad=True)
    a1 = a2 = torch.tensor([1.0, 0.0])
    for b, ratio, cos in (([0.0, 3.0], 1.5, 0.0), ([-1.0, 0.0], 0.5, -1.0), ([4.0, 4.0], 2 * 2 ** 0.5, 2 ** -0.5)):
        losses = torch.stack([a1 @ p, a2 @ p, torch.tensor(b) @ p])
        share = ex.gradient_share(losses, [p])
        assert share["kd_grad"] == pytest.approx(ratio) and share["kd_grad_cos"] == pytest.approx(cos, abs=1e-7)
    constant_kd = torch.stack([a1 @ p, torch.tensor(0.0)])  # no KD term reaches the weights
    share = ex.gradient_share(constant_kd, [p])
    assert share["kd_grad"] == 0.0 and np.isnan(share["kd_grad_cos"])


def explained_step(method: str, **args) -> dict[str, float]:
    """The items of `explain`'s step (losses, gradient share) for a random yolov8n student and yolov8s teacher on two
    plain grey pictures with one box each, under `method` and the yolokd arguments `args`."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from yolokd.config import kd_defaults

    torch.manual_seed(0)
    student = DetectionModel("yolov8n.yaml", nc=6, verbose=False)
    student.args = get_cfg()
    teacher = DetectionModel("yolov8s.yaml", nc=6, verbose=False).eval()
    crit = build_distillation([method], student, teacher, SimpleNamespace(**{**kd_defaults(), **args}))
    pictures = [ex.Picture(file=Path(f"{i}.png"), image=np.full((64, 64, 3), 90 + 40 * i, np.uint8),
                           boxes=np.array([[i, 16, 16, 48, 40]], np.float32), gt="labels") for i in range(2)]
    return ex.explain(crit, student, teacher, pictures).items


def test_gradient_share_of_explain_scales_with_the_weight():
    """On the real criterion: doubling `ld`'s weights (uncapped) doubles kd_grad and leaves its cosine and the task's
    gradient alone, so the last loss entry is the KD sum and the rest the task's."""
    shares = [explained_step("ld", ld_cls_weight=k, ld_box_weight=0.25 * k) for k in (1.0, 2.0)]
    assert shares[1]["kd_grad"] == pytest.approx(2 * shares[0]["kd_grad"], rel=1e-4)
    assert shares[1]["kd_grad_cos"] == pytest.approx(shares[0]["kd_grad_cos"], abs=1e-5)
    assert 0 < shares[0]["kd_grad"] and -1 <= shares[0]["kd_grad_cos"] <= 1


# ---------------------------------------------------------------------------------------------- during training
def test_figure_epochs_are_first_middle_last():
    assert ex.figure_epochs(30) == {1, 15, 30} and ex.figure_epochs(4) == {1, 2, 4} and ex.figure_epochs(1) == {1}


def test_kd_agree_hand_value():
    # anchors: teacher top-class p_t = 0.9 (student 0.6 there), 0.7 (student 0.7), 0.2 (not confident: left out)
    p_t = torch.tensor([[[0.9, 0.1, 0.2], [0.05, 0.7, 0.1]]])  # (B=1, nc=2, A=3)
    p_s = torch.tensor([[[0.6, 0.9, 0.9], [0.9, 0.7, 0.9]]])
    agree = kd_agreement(torch.logit(p_t), torch.logit(p_s))
    assert torch.isclose(agree, torch.tensor((0.3 + 0.0) / 2), atol=1e-6)
    assert kd_agreement(torch.full((1, 2, 3), -5.0), torch.zeros(1, 2, 3)) == 0  # confident nowhere


def train(tiny_data, train_kwargs, **extra):
    from ultralytics import YOLO

    from yolokd.trainer import DistillationTrainer

    yolo = YOLO("yolov8n.yaml")
    kw = {**train_kwargs, "data": tiny_data, "teacher": "yolov8n.yaml", "method": "pfi", "batch": 16, **extra}
    yolo.train(trainer=DistillationTrainer, **kw)
    return yolo.trainer


def test_plots_true_draws_the_figures_kd_results_and_kd_agree(tiny_data, train_kwargs):
    t = train(tiny_data, train_kwargs, plots=True, epochs=4, val=False, name="explain_plots")
    figures = sorted(p.name for p in t.save_dir.glob("kd_explain_epoch*.png"))
    assert figures == ["kd_explain_epoch1.png", "kd_explain_epoch2.png", "kd_explain_epoch4.png"]
    assert (t.save_dir / "kd_results.png").is_file() and (t.save_dir / "results.png").is_file()
    assert all(0 <= r["train/kd_agree"] <= 1 for r in read_results(t.save_dir))


def test_plots_false_runs_none_of_it(tiny_data, train_kwargs, monkeypatch):
    from yolokd.methods.base import DistillMethod, MethodSet

    called = []
    spy = lambda name: lambda *a, **k: called.append(name)  # noqa: E731
    monkeypatch.setattr("yolokd.criterion.kd_agreement", spy("kd_agreement"))
    monkeypatch.setattr(MethodSet, "recording", spy("recording"))
    monkeypatch.setattr(ex, "epoch_figure", spy("epoch_figure"))
    monkeypatch.setattr("yolokd.trainer.plot_kd_results", spy("plot_kd_results"))
    real_record = DistillMethod.record
    monkeypatch.setattr(DistillMethod, "record",
                        lambda self, *a: (self._sink is not None and called.append("stored")) or real_record(self, *a))
    t = train(tiny_data, train_kwargs, plots=False, name="explain_no_plots")
    assert called == []
    assert not list(t.save_dir.glob("kd_*.png")) and "train/kd_agree" not in read_results(t.save_dir)[0]


def test_gradient_share_is_the_applied_gradient_under_the_gradient_cap():
    """kd_grad is measured as applied: with `kd_grad_ratio` -> 0 nothing of dfd's gradient reaches the student."""
    shares = {ratio: explained_step("dfd", kd_grad_ratio=ratio)["kd_grad"] for ratio in (0.0, 1e-9)}
    assert shares[0.0] > 0.1 and shares[1e-9] < 1e-4  # float32 rounding of the difference: ~1e-6
