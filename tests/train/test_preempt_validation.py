"""A SIGTERM that lands on a validation step is honoured before the validation starts: the checkpoint is
written first (a multi-minute validation could outlast SLURM's signal lead or a pod's grace period), and
the resumed run ends bitwise where an undisturbed one does."""

import json
import os
import signal
import uuid

import torch
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from anncli.errors import EXIT_PREEMPTED
from anncli.recipe import load_recipe
from conftest import tiny_overrides

DEMO = "recipes/demo.yaml"


def _train(work_dir, synth_root, signal_on_step: int | None = None) -> int:
    """The real loop on 2 gloo ranks; with `signal_on_step`, a real SIGTERM reaches rank 1 alone during that
    step, after the step's asynchronous stop vote has started. Returns the ranks' exit codes."""
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                       rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    codes = elastic_launch(cfg, entrypoint=_rank)(str(work_dir), str(synth_root), signal_on_step)
    assert codes[0] == codes[1], codes
    return codes[0]


def _rank(work_dir: str, synth_root: str, signal_on_step: int | None) -> int:
    from pathlib import Path

    from anncli.cluster.distributed import init_distributed
    from anncli.train import loop

    torch.set_num_threads(1)
    work_dir, synth_root = Path(work_dir), Path(synth_root)
    info = init_distributed()
    if info.rank == 0:
        signal_on_step = None
    sets = tiny_overrides(synth_root, **{"train.iters": 6, "train.checkpoint_every": 6, "train.val_every": 4})
    recipe = load_recipe(DEMO, sets[1::2])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    run = loop._set_up(recipe, loop.TrainOptions(DEMO, work_dir=work_dir), info, loop.StopFlag())
    calls, criterion = [], run.criterion

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == signal_on_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return criterion(*args, **kwargs)

    run.criterion = signalled
    try:
        return loop._loop(run)
    finally:
        run.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_a_signal_on_a_validation_step_saves_before_validating_and_resumes_bitwise(tmp_path, synth_root):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _train(whole, synth_root) == 0
    assert [e["step"] for e in _events(whole) if e["event"] == "val"] == [4]  # step 4 validates

    assert _train(cut, synth_root, signal_on_step=4) == EXIT_PREEMPTED
    events = [e["event"] for e in _events(cut) if e.get("step") == 4]
    assert "checkpoint" in events and "preempted" in events and "val" not in events
    assert (cut / "checkpoints" / "step-000004" / "COMPLETE").is_file()

    assert _train(cut, synth_root) == 0  # resumes from step 4
    assert [e["step"] for e in _events(cut) if e["event"] == "resume"] == [4]
    final = [torch.load(d / "checkpoints" / "step-000006" / "model.pt", weights_only=True) for d in (whole, cut)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
