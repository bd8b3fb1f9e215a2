"""Tests of mamlpp-eval (single checkpoint, top-k ensemble with averaged logits, 95% CI, JSON
report, one-shot benchmark wiring, rejected input) and of mamlpp-plot, on a tiny run over a
generated Omniglot tree."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mamlpp_ext.training import run_data as RD
from mamlpp_ext.training import scoring as SC
from mamlpp_ext.training import evaluate as E
from mamlpp_ext.training import plot as P
from mamlpp_ext.training.trainer import Trainer
from mamlpp_ext.model.config import MAMLConfig
from mamlpp_ext.data.synthetic import make_fake_omniglot

TINY = dict(ways=3, shots=1, queries=1, meta_batch=2, num_stages=2, num_filters=4, inner_steps=2,
            eval_inner_steps=2, total_epochs=3, iterations_per_epoch=3, eval_tasks=6, msl_epochs=2, meta_lr=0.01)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("eval")
    mp.setenv("MAMLPP_CACHE_DIR", str(base / "cache"))
    root = make_fake_omniglot(base / "omniglot", alphabets=(4, 2), characters=6, drawings=4)
    data = RD.DataOptions(root=str(root), split="lake", lake_val_alphabets=1, check_counts=False)
    tr = Trainer(MAMLConfig(**TINY), base / "run", backend="batched", data=data, keep_top_k=3, log_every=1,
                   progress=False, tensorboard=False, handle_signals=False)
    tr.fit()
    yield base / "run"
    mp.undo()


def test_confidence_interval_formula():
    a = [1.0, 0.0, 1.0, 1.0]
    assert SC.confidence_interval(a) == pytest.approx(1.96 * np.std(a) / 2.0)
    assert SC.confidence_interval([0.5] * 9) == 0.0


def test_single_checkpoint_matches_learner_evaluate(run):
    path = run / "checkpoints" / "latest.pt"
    res = E.evaluate_checkpoints([path], split_set="test", num_tasks=10, batch_size=4)
    assert res["num_tasks"] == 10 and len(res["task_accuracies"]) == 10
    # recompute by hand with the learner's own evaluate on the same fixed tasks
    learners, ckpts = E.load_members([path])
    data = RD.DataOptions.from_dict(ckpts[0]["data"])
    ds = RD.eval_dataset(RD.load_pools(learners[0].config, data)["test"], learners[0].config, data, 10, 5)
    accs = torch.cat([learners[0].evaluate(*ds[b])["task_accuracies"] for b in range(len(ds))]).double().numpy()
    assert res["accuracy"] == pytest.approx(accs.mean())
    assert res["ci95"] == pytest.approx(1.96 * accs.std() / math.sqrt(10))
    assert res["member_accuracies"] == [pytest.approx(accs.mean())]


def test_ensemble_averages_logits(run):
    paths = E.resolve_members([run], top_k=2)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert [p.name for p in paths] == [b["path"] for b in best[:2]]
    learners, ckpts = E.load_members(paths)
    data = RD.DataOptions.from_dict(ckpts[0]["data"])
    ds = RD.eval_dataset(RD.load_pools(learners[0].config, data)["test"], learners[0].config, data, 8, 4)
    res = SC.score_tasks(learners, ds)
    expect = []
    for b in range(len(ds)):
        sx, sy, qx, qy = ds[b]
        logits = sum(m.evaluate(sx, sy, qx)["logits"] for m in learners) / len(learners)
        expect.append((logits.argmax(-1) == qy).double().mean(-1))
    assert res["task_accuracies"] == pytest.approx(torch.cat(expect).tolist())
    assert len(res["member_accuracies"]) == 2


def test_cli_writes_report(run, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert E.main([str(run), "--tasks", "9", "--top-k", "2", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["ensemble_size"] == 2 and len(rep["members"]) == 2
    t = rep["test"]
    assert t["num_tasks"] == 9 and 0 <= t["accuracy"] <= 1 and t["ci95"] >= 0
    assert f"{100 * t['accuracy']:.2f}% ± {100 * t['ci95']:.2f}%" in printed
    # default k = ensemble_top_k of the config (5), capped by the 3 kept checkpoints
    assert len(E.resolve_members([run])) == 3


def test_validation_tasks_agree_with_training_log(run):
    """The trainer's last validation and mamlpp-eval on the val tasks score the same fixed tasks."""
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "epoch"][-1]
    res = E.evaluate_checkpoints([run / "checkpoints" / "latest.pt"], split_set="val", num_tasks=TINY["eval_tasks"])
    assert res["accuracy"] == pytest.approx(last["val_accuracy"])


def test_one_shot_benchmark_wiring(run, monkeypatch):
    """Score stand-in runs with learners whose logits we control: the benchmark must hand the
    (1, 20, 1, H, W) support/query tensors to each member, average the members' logits and score
    the argmax against the query labels exactly."""
    from mamlpp_ext.data import OneShotRun
    from mamlpp_ext.model.meta_learner import MAMLPlusPlus

    cfg = MAMLConfig(**{**TINY, "ways": 20})
    g = torch.Generator().manual_seed(0)
    sx = torch.rand(20, 1, 28, 28, generator=g)
    perm = torch.randperm(20, generator=g)
    runs = [OneShotRun("run01", sx, torch.arange(20), sx[perm], perm, (), ()),
            OneShotRun("run02", sx, torch.arange(20), sx[perm.flip(0)], perm.flip(0), (), ())]

    class Controlled:
        """A 20-way member whose logits favour ``answer(query_y)``; records what it was given."""

        def __init__(self, answer, weight):
            self.config, self.answer, self.weight, self.seen = cfg, answer, weight, []

        def evaluate(self, support_x, support_y, query_x):
            self.seen.append((tuple(support_x.shape), tuple(support_y.shape), tuple(query_x.shape)))
            truth = perm if torch.equal(query_x[0], sx[perm]) else perm.flip(0)
            return {"logits": self.weight * F.one_hot(self.answer(truth), 20).float()[None]}

    wrong_last5 = Controlled(lambda y: torch.cat([y[:15], (y[15:] + 1) % 20]), 1.0)  # 15 of 20 right
    monkeypatch.setattr("mamlpp_ext.data.load_one_shot_runs", lambda root=None, **kw: runs)
    rep = E.one_shot_benchmark([wrong_last5])
    assert [r["correct"] for r in rep["runs"]] == [15, 15] and rep["accuracy"] == 0.75
    assert rep["error"] == 0.25 and wrong_last5.seen[0] == ((1, 20, 1, 28, 28), (1, 20), (1, 20, 1, 28, 28))
    # an ensemble averages logits: a confident right member outvotes a less confident wrong one
    right = Controlled(lambda y: y, 2.0)
    assert E.one_shot_benchmark([wrong_last5, right])["accuracy"] == 1.0
    with pytest.raises(ValueError, match="20-way 1-shot"):
        E.one_shot_benchmark([MAMLPlusPlus(MAMLConfig(**TINY), backend="batched")])


@pytest.mark.parametrize("argv, needle", [
    (["/no/such/run"], "does not exist"),
    (["RUN", "--top-k", "0"], "--top-k must be >= 1"),
    (["RUN", "--tasks", "0"], "--tasks must be >= 1"),
    (["RUN", "--backend", "warp"], "--backend: unknown backend 'warp'"),
    (["RUN", "--dataset-root", "/no/where"], "--dataset-root: /no/where does not exist"),
    (["RUN", "--one-shot-only"], "--one-shot: the benchmark is Omniglot 20-way 1-shot"),
])
def test_bad_eval_command_lines(run, argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        E.main([str(run) if a == "RUN" else a for a in argv] + ["--no-progress"])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_ensemble_of_different_task_shapes_is_rejected(run, tmp_path):
    ck = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    ck["config"]["ways"] = 4
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"differ in \['ways'\]"):
        E.load_members([run / "checkpoints" / "latest.pt", tmp_path / "other.pt"])


def test_plot_writes_png(run, tmp_path):
    out = P.plot_run(run, tmp_path / "c.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert P.main([str(run), "-o", str(tmp_path / "d.png")]) == 0
    with pytest.raises(SystemExit):
        P.main([str(tmp_path / "nothing")])
