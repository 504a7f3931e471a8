"""Two real gloo ranks end without Python tracebacks from torchrun: preempted by SIGTERM (exit 124, the
checkpoint saved) and stopped by a bad shard (one line from the ranks); and without DDP's stride warning."""

import json
import signal

from anncli.errors import EXIT_PREEMPTED
from conftest import ann_cmd, start_until_checkpoint, tiny_overrides

NOISE = ("Traceback", "SignalException", "ChildFailedError", "Grad strides do not match")


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
