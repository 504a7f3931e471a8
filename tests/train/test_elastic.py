"""Elastic resume: a run preempted on one world size continues on another with the same global batches.

Real `ann train` processes with gloo ranks. The undisturbed reference runs on 2 ranks (per-rank batch 4,
sync-BN, `loss.normalize: global`, dropout off); the elastic run is killed after a checkpoint and resumed on
other world sizes. Sample traces must be equal at every step; losses and weights only close, because a
different split sums the same numbers in another order.
"""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from anncli.errors import EXIT_PREEMPTED
from anncli.cluster.supervisor import kill_tree
from conftest import ann_cmd, run_ann, start_until_checkpoint, tiny_overrides

# SGD, not the demo's AdamW: Adam divides by the gradient's magnitude, so the conv biases that batch norm
# makes irrelevant (zero true gradient) take full-size steps on float noise, which differs with the split
# (measured: 1.1e-4 relative L2 over the parameters after 2 → 1 → 4 ranks with AdamW).
ELASTIC = {"model.dropout": 0.0, "loss.normalize": "global", "train.trace_samples": "true", "optim.name": "sgd",
           "optim.lr": 0.01, "train.batch_size": 4, "train.iters": 12, "train.checkpoint_every": 4}


def _args(synth_root, run: Path, nproc: int, **changes) -> list:
    return ["train", "recipes/demo.yaml", "--nproc-per-node", nproc, "--work-dir", run,
            *tiny_overrides(synth_root, **{**ELASTIC, **changes})]


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def _steps(run: Path) -> dict[int, dict]:
    """The last `step` record of every step (a step re-run after a kill is logged twice)."""
    return {e["step"]: e for e in _events(run) if e["event"] == "step"}


def _run_until_checkpoint(args: list, run: Path, step: int, sig: int) -> int:
    """Train until checkpoint `step` is complete, then send `sig` (SIGKILL: to every process of the run, as a
    node crash would; its ranks save and exit on their own when only their parents die)."""
    proc = start_until_checkpoint(ann_cmd(*args), run, step, run.parent / f"{run.name}-{step}.log")
    if sig == signal.SIGKILL:
        kill_tree(proc.pid)
    else:
        proc.send_signal(sig)
    return proc.wait(timeout=300)


def _rel_l2(a: dict, b: dict) -> float:
    """Relative L2 distance over all parameters (batch-norm running statistics left out)."""
    keys = [k for k in a if a[k].is_floating_point() and ".running_" not in k]
    assert keys == [k for k in b if b[k].is_floating_point() and ".running_" not in k]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    norm = sum(float(a[k].double().pow(2).sum()) for k in keys)
    return (diff / norm) ** 0.5


def _weights(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step-{step:06d}" / "model.pt", weights_only=True)


def _assert_same_training(ref: Path, run: Path, iters: int) -> tuple[float, float]:
    """Equal traces at every step, losses within 1e-3 relative; returns (max loss rel diff, weights rel L2)."""
    a, b = _steps(ref), _steps(run)
    assert sorted(a) == sorted(b) == list(range(1, iters + 1))
    worst = 0.0
    for step in a:
        assert a[step]["samples_sha256"] == b[step]["samples_sha256"], f"step {step}: other samples"
        for key in ("loss", "aux_loss"):
            rel = abs(a[step][key] - b[step][key]) / abs(a[step][key])
            assert rel < 1e-3, (step, key, a[step][key], b[step][key])
            worst = max(worst, rel)
    return worst, _rel_l2(_weights(ref, iters), _weights(run, iters))


def _record(run: Path, figures: dict) -> None:
    """The measured cross-world figures beside the run (`pytest -s` prints them too)."""
    (run.parent / "figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))


@pytest.mark.slow
def test_ddp_resumes_on_1_then_4_ranks_with_the_same_batches(tmp_path, synth_root):
    ref = tmp_path / "ref"
    res = run_ann(*_args(synth_root, ref, 2))
    assert res.returncode == 0, res.stderr[-3000:]

    run = tmp_path / "elastic"
    assert _run_until_checkpoint(_args(synth_root, run, 2), run, 4, signal.SIGKILL) == -signal.SIGKILL
    # 1 rank: the recipe's per-rank batch 8 keeps the effective batch 8 without accumulation
    code = _run_until_checkpoint(_args(synth_root, run, 1, **{"train.batch_size": 8}), run, 8, signal.SIGTERM)
    assert code == EXIT_PREEMPTED
    # 4 ranks: per-rank batch 4 would make 16; the split lowers it to 2
    res = run_ann(*_args(synth_root, run, 4))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 x 4 ranks x 1 accumulation step(s) = 8 (per-rank batch lowered from 4)" in res.stderr

    resumes = [e for e in _events(run) if e["event"] == "resume"]
    assert [(e["saved_world_size"], e["world_size"], e["batch_size"]) for e in resumes] == [(2, 1, 8), (1, 4, 2)]
    assert all(e["effective_batch"] == 8 and e["accum_steps"] == 1 for e in resumes)
    loss_rel, weights_rel = _assert_same_training(ref, run, 12)
    assert weights_rel < 1e-4, weights_rel
    _record(run, {"worlds": [2, 1, 4], "resumed_at": [e["step"] for e in resumes],
                    "max_loss_rel_diff": loss_rel, "weights_rel_l2": weights_rel})


@pytest.mark.slow
def test_deepspeed_zero2_resumes_on_1_then_2_ranks(tmp_path, synth_root):
    ds = {"engine": "deepspeed", "deepspeed.zero_stage": 2, "train.iters": 6, "train.checkpoint_every": 2}
    ref = tmp_path / "ref"
    res = run_ann(*_args(synth_root, ref, 2, **ds))
    assert res.returncode == 0, res.stderr[-3000:]

    run = tmp_path / "elastic"
    assert _run_until_checkpoint(_args(synth_root, run, 2, **ds), run, 2, signal.SIGKILL) == -signal.SIGKILL
    code = _run_until_checkpoint(_args(synth_root, run, 1, **ds, **{"train.batch_size": 8}), run, 4, signal.SIGKILL)
    assert code == -signal.SIGKILL
    res = run_ann(*_args(synth_root, run, 2, **ds))
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = run / "checkpoints" / "step-000006"
    assert (ckpt / "zero.pt").is_file() and not (ckpt / "deepspeed").exists()
    resumes = [e for e in _events(run) if e["event"] == "resume"]
    assert [(e["saved_world_size"], e["world_size"]) for e in resumes] == [(2, 1), (1, 2)]
    loss_rel, weights_rel = _assert_same_training(ref, run, 6)
    _record(run, {"engine": "deepspeed-zero2", "worlds": [2, 1, 2], "resumed_at": [e["step"] for e in resumes],
                                "max_loss_rel_diff": loss_rel, "weights_rel_l2": weights_rel})


def test_a_world_that_cannot_keep_the_effective_batch_is_refused_in_one_line(tmp_path, synth_root):
    run = tmp_path / "run"
    res = run_ann(*_args(synth_root, run, 1, **{"train.iters": 2, "train.checkpoint_every": 2, "train.batch_size": 2}))
    assert res.returncode == 0, res.stderr[-3000:]
    plan = run_ann(*_args(synth_root, run, 2, **{"train.iters": 2}), "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "split:           1 x 2 ranks x 1 accumulation step(s) = 2 (per-rank batch lowered from 4)" in plan.stdout
    why = "cannot resume on 3 rank(s): effective batch 2 cannot be split evenly over 3 ranks"
    refused = run_ann(*_args(synth_root, run, 3, **{"train.iters": 2}), "--dry-run")
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1 and why in refused.stderr
    started = run_ann(*_args(synth_root, run, 3, **{"train.iters": 2}))  # the ranks refuse it the same way
    assert started.returncode == 2 and why in started.stderr and "Traceback" not in started.stderr


def test_a_crafted_deepspeed_state_in_a_checkpoint_is_refused_without_running(tmp_path):
    """DeepSpeedEngine.load reads zero.pt with weights_only: a pickle that runs code is one line, never run."""
    import pickle
    from types import SimpleNamespace

    from anncli.train.engine import DeepSpeedEngine
    from anncli.errors import UserError

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / DeepSpeedEngine.STATE).write_bytes(pickle.dumps({"format": "ann-zero-full", "x": Evil()}))
    engine = SimpleNamespace(STATE=DeepSpeedEngine.STATE, model=None, _grad_scaler=lambda: None)
    with pytest.raises(UserError, match=r"zero\.pt: cannot be read as a plain tensor file"):
        DeepSpeedEngine.load(engine, tmp_path)
    assert not marker.exists()
    (tmp_path / DeepSpeedEngine.STATE).unlink()
    with pytest.raises(UserError, match="has no DeepSpeed state zero.pt"):
        DeepSpeedEngine.load(engine, tmp_path)
