"""Consolidated DeepSpeed ZeRO state: saved by 2 ranks, loaded by 1, 2 or 3, training continues as if uninterrupted.

Real gloo ranks (elastic_launch) running real DeepSpeed ZeRO-1/2 engines on CPU. Every step's global batch
is a fixed function of the step, and rank r of W takes the r-th W-th of it, so a run on another world size
sees the same data: only the order of floating-point sums differs.
"""

import json
import os
import pickle
import sys
import uuid

import pytest
import torch
from torch import nn
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from anncli.runs.zero_state import ZeroStateError, read_full_state

GLOBAL_BATCH = 12
STEPS_BEFORE, STEPS_AFTER = 3, 3
CONFIGS = [(1, "sgd"), (2, "sgd"), (1, "adamw"), (2, "adamw"), (0, "adamw")]
# (saved stage, loaded stage, optimizer): the file does not depend on the stage that wrote it
CROSS = [(1, 2, "sgd"), (2, 0, "adamw")]


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 7 tensors of odd sizes (903 elements): partition borders fall inside parameters for 2 and 3 ranks
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.GroupNorm(1, 5), nn.ReLU(), nn.Conv2d(5, 7, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, 4))


def _global_batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 3, 9, 9, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)


def _engine(stage: int, optim: str, world: int):
    import deepspeed

    model = _model()
    if optim == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=1e-2)
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 2**31 - 1}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def _train(engine, steps, rank: int, world: int) -> None:
    per = GLOBAL_BATCH // world
    for _ in range(steps):
        x, y = _global_batch(engine.global_steps)
        loss = nn.functional.cross_entropy(engine(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per])
        engine.backward(loss)
        engine.step()


def _worker(out: str, mode: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import torch.distributed as dist

    from anncli.runs.zero_state import gather_full_state, load_full_state, read_full_state

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for stage, optim in CONFIGS:
        name = f"z{stage}-{optim}"
        engine = _engine(stage, optim, world)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=7)
        if mode == "reference":
            _train(engine, STEPS_BEFORE, rank, world)
            scaler._scale = torch.tensor(512.0)  # a scaler state that differs from a fresh one
            saved = gather_full_state(engine, scaler)
            if rank == 0:
                torch.save(saved, os.path.join(out, f"{name}-saved.pt"))
        else:
            load_full_state(engine, read_full_state(os.path.join(out, f"{name}-saved.pt")), scaler)
            if rank == 0:
                with open(os.path.join(out, f"{name}-scaler-{world}.json"), "w") as f:
                    json.dump({"scale": scaler.get_scale(), "growth_interval": scaler.get_growth_interval()}, f)
        _train(engine, STEPS_AFTER, rank, world)
        final = gather_full_state(engine)
        if rank == 0:
            torch.save(final, os.path.join(out, f"{name}-{mode}-{world}.pt"))
        engine.destroy()
    if mode == "resumed" and world == 1:
        for saved, stage, optim in CROSS:
            engine = _engine(stage, optim, world)
            load_full_state(engine, read_full_state(os.path.join(out, f"z{saved}-{optim}-saved.pt")))
            _train(engine, STEPS_AFTER, rank, world)
            torch.save(gather_full_state(engine), os.path.join(out, f"z{saved}-to-z{stage}-{optim}.pt"))
            engine.destroy()
    dist.destroy_process_group()


def _launch(out, mode: str, nproc: int) -> None:
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    elastic_launch(cfg, entrypoint=_worker)(str(out), mode)


def _flat(state: dict) -> dict[str, torch.Tensor]:
    out = {f"param/{k}": v for k, v in state["params"].items()}
    for key, tensors in state["optimizer"]["states"].items():
        out.update({f"{key}/{k}": v for k, v in tensors.items()})
    for key, v in state["optimizer"]["scalars"].items():
        out[f"scalar/{key}"] = torch.as_tensor(v)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    _launch(out, "reference", 2)
    for world in (2, 1, 3):
        _launch(out, "resumed", world)
    return out


@pytest.mark.slow  # the `runs` fixture: four DeepSpeed launches of 1-3 gloo ranks, minutes on 2 cores
@pytest.mark.long
@pytest.mark.parametrize("stage,optim", CONFIGS)
def test_saved_state_is_complete_and_plain(runs, stage, optim):
    saved = read_full_state(runs / f"z{stage}-{optim}-saved.pt")  # weights_only=True
    model = _model()
    assert set(saved["params"]) == {n for n, _ in model.named_parameters()}
    assert all(saved["params"][n].shape == p.shape and saved["params"][n].dtype == torch.float32
               for n, p in model.named_parameters())
    want = {"sgd": {"momentum_buffer"}, "adamw": {"exp_avg", "exp_avg_sq"}}[optim]
    assert set(saved["optimizer"]["states"]) == want
    assert all(t.abs().sum() > 0 for t in saved["optimizer"]["states"][sorted(want)[0]].values())
    if optim == "adamw":
        assert float(saved["optimizer"]["scalars"]["step"]) == STEPS_BEFORE
    assert saved["engine"]["global_steps"] == STEPS_BEFORE and saved["world_size"] == 2
    assert saved["scaler"]["scale"] == 512.0


@pytest.mark.slow  # the `runs` fixture: four DeepSpeed launches of 1-3 gloo ranks, minutes on 2 cores
@pytest.mark.long
@pytest.mark.parametrize("stage,optim", CONFIGS)
def test_same_world_resume_is_bitwise(runs, stage, optim):
    ref = _flat(torch.load(runs / f"z{stage}-{optim}-reference-2.pt", weights_only=True))
    got = _flat(torch.load(runs / f"z{stage}-{optim}-resumed-2.pt", weights_only=True))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    scaler = json.loads((runs / f"z{stage}-{optim}-scaler-2.json").read_text())
    assert scaler == {"scale": 512.0, "growth_interval": 7}


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("stage,optim", CONFIGS)
def test_other_world_resume_is_close(runs, stage, optim, world):
    ref = _flat(torch.load(runs / f"z{stage}-{optim}-reference-2.pt", weights_only=True))
    got = _flat(torch.load(runs / f"z{stage}-{optim}-resumed-{world}.pt", weights_only=True))
    assert ref.keys() == got.keys()
    start = torch.load(runs / f"z{stage}-{optim}-saved.pt", weights_only=True)["params"]
    moved = max(float((ref[f"param/{k}"] - v).detach().norm() / v.detach().norm()) for k, v in start.items())
    assert moved > 1e-3  # the continuation really trained
    for k in ref:
        err = float((ref[k] - got[k]).double().norm() / ref[k].double().norm().clamp_min(1e-12))
        assert err < 1e-5, (k, err)


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("saved,stage,optim", CROSS)
def test_a_state_loads_into_another_zero_stage(runs, saved, stage, optim):
    ref = _flat(torch.load(runs / f"z{saved}-{optim}-reference-2.pt", weights_only=True))
    got = _flat(torch.load(runs / f"z{saved}-to-z{stage}-{optim}.pt", weights_only=True))
    assert ref.keys() == got.keys()
    for k in ref:
        err = float((ref[k] - got[k]).double().norm() / ref[k].double().norm().clamp_min(1e-12))
        assert err < 1e-5, (k, err)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "zero.pt"
    path.write_bytes(pickle.dumps({"format": "ann-zero-full", "x": Evil()}))
    with pytest.raises(ZeroStateError, match="cannot be read as a plain tensor file"):
        read_full_state(path)
    torch.save({"format": "ann-zero-full", "x": Evil()}, tmp_path / "zero2.pt")
    assert marker.exists() is False
    with pytest.raises(ZeroStateError, match="cannot be read as a plain tensor file"):
        read_full_state(tmp_path / "zero2.pt")
    assert not marker.exists()
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ZeroStateError, match="not a consolidated DeepSpeed state"):
        read_full_state(tmp_path / "other.pt")
