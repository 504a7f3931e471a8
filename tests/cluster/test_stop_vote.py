"""The stop flag of one rank reaches every rank one step later, on the same step, on 2 real gloo ranks."""

import json
import os
import uuid

from torch.distributed.launcher.api import LaunchConfig, elastic_launch

SIGNALLED_RANK, SIGNALLED_AT = 1, 3


def _worker(out_dir: str) -> None:
    import torch

    from anncli.cluster.distributed import init_distributed, teardown
    from anncli.cluster.stop import StopVote

    torch.set_num_threads(1)
    info = init_distributed()
    vote = StopVote(info.device)
    agreed = []
    for step in range(1, 7):
        signalled = info.rank == SIGNALLED_RANK and step >= SIGNALLED_AT  # the flag stays set once set
        agreed.append(vote.agreed(signalled))
    vote.close()
    with open(os.path.join(out_dir, f"rank{info.rank}.json"), "w") as f:
        json.dump(agreed, f)
    teardown()


def test_one_ranks_signal_is_agreed_by_every_rank_at_the_next_step(tmp_path):
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()),
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    elastic_launch(cfg, entrypoint=_worker)(str(tmp_path))
    votes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = [step > SIGNALLED_AT for step in range(1, 7)]  # the vote of step 3 is read at step 4
    assert votes[0] == votes[1] == expected


def test_a_single_process_stops_at_the_step_of_its_signal():
    import torch

    from anncli.cluster.stop import StopVote

    vote = StopVote(torch.device("cpu"))
    assert [vote.agreed(flag) for flag in (False, True)] == [False, True]
