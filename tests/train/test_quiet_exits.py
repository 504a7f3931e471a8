"""Two real gloo ranks end without Python tracebacks from torchrun when preempted by SIGTERM (exit 124, the
checkpoint saved), and print no DDP stride warning. (A bad shard stopping 2 ranks in one line is in
tests/data/test_data_synth_sets.py.)"""

import json
import signal

import pytest

from anncli.errors import EXIT_PREEMPTED
from conftest import ann_cmd, start_until_checkpoint, tiny_overrides

NOISE = ("Traceback", "SignalException", "ChildFailedError", "Grad strides do not match")


@pytest.mark.slow  # two real gloo ranks: about a minute on a loaded 2-core machine
def test_sigterm_on_two_ranks_saves_and_exits_124_without_a_traceback(synth_root, tmp_path):
    run, log = tmp_path / "run", tmp_path / "train.log"
    cmd = ann_cmd("train", "recipes/demo.yaml", "--work-dir", run, "--nproc-per-node", 2,
                  *tiny_overrides(synth_root, **{"train.iters": 400, "train.checkpoint_every": 2,
                                                 "data.num_workers": 0}))
    proc = start_until_checkpoint(cmd, run, 2, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == EXIT_PREEMPTED, log.read_text()[-3000:]
    err = log.read_text()
    assert not [n for n in NOISE if n in err], err[-3000:]
    assert "stopped by SIGTERM; exit code 124" in err
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    (preempted,) = [e for e in events if e["event"] == "preempted"]
    assert (run / "checkpoints" / f"step-{preempted['step']:06d}" / "COMPLETE").is_file()


def test_ctrl_c_of_a_single_process_run_names_the_newest_checkpoint_and_exits_130(synth_root, tmp_path):
    """A terminal's Ctrl-C (SIGINT to the foreground process) of an in-process run ends in the line a
    supervised run ends in: where `--resume auto` continues, no traceback."""
    run, log = tmp_path / "run", tmp_path / "train.log"
    cmd = ann_cmd("train", "recipes/demo.yaml", "--work-dir", run,
                  *tiny_overrides(synth_root, **{"train.iters": 400, "train.checkpoint_every": 2, "data.num_workers": 0}))
    proc = start_until_checkpoint(cmd, run, 2, log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    last = log.read_text().strip().splitlines()[-1]
    assert "Traceback" not in log.read_text()
    newest = max(p for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").is_file())
    assert last == f"ann: interrupted; last complete checkpoint: {newest} (--resume auto continues from it)", last
