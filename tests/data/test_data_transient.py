"""A transient read error (a real `pipe:` source whose command fails once) does not change what training
reads: it is retried with backoff (`data.retries`), and without retries the cut lasts one cycle only, so
an undisturbed run and a run resumed from its checkpoint see the same samples."""

import logging
import shlex

from test_data_safety import _raw_shard, _stream
from test_data_stream import _take


def _fail_once(shard: str, mark) -> str:
    """A pipe: command that exits 1 the first time it runs (no output) and streams the shard afterwards."""
    script = f"if [ -e {shlex.quote(str(mark))} ]; then cat {shlex.quote(shard)}; else touch {shlex.quote(str(mark))}; exit 1; fi"
    return f"pipe:sh -c {shlex.quote(script)}"


def _keys(stream, n: int) -> list[list[str]]:
    return [b["keys"] for b in _take(stream, n)]


def _sources(tmp_path):
    shards = [_raw_shard(tmp_path / f"t-train-{i:06d}.tar", [f"s{i}_{k}" for k in range(8)]) for i in range(3)]
    mark = tmp_path / "failed-once"
    return [shards[0], _fail_once(shards[1], mark), shards[2]], [8, 8, 8], mark


MICRO_BATCHES = 24  # two cycles of 24 samples in micro-batches of 2


def test_a_read_that_fails_once_is_retried_and_the_run_reads_what_a_resumed_one_reads(tmp_path, caplog):
    urls, counts, mark = _sources(tmp_path)
    with caplog.at_level(logging.INFO, logger="anncli.data"):
        undisturbed = _keys(_stream(urls, counts, retries=2, max_skip_fraction=0.9), MICRO_BATCHES)
    assert mark.exists() and any("retry 1 of 2" in r.getMessage() for r in caplog.records)
    assert not any("is cut" in r.getMessage() for r in caplog.records)
    clean = _keys(_stream(urls, counts, retries=2), MICRO_BATCHES)  # the command no longer fails
    assert undisturbed == clean
    resumed = _stream(urls, counts, retries=2)
    resumed.seek_step(5)  # a checkpoint after the failure, read by a fresh run
    assert _keys(resumed, MICRO_BATCHES - 5) == undisturbed[5:]


def test_without_retries_a_cut_lasts_one_cycle(tmp_path):
    urls, counts, mark = _sources(tmp_path)
    cut = _keys(_stream(urls, counts, retries=0, max_skip_fraction=0.9), MICRO_BATCHES)
    clean = _keys(_stream(urls, counts, retries=0), MICRO_BATCHES)
    half = MICRO_BATCHES // 2
    assert cut[:half] != clean[:half]  # cycle 0: shard 1's samples were replaced by substitutes
    assert cut[half:] == clean[half:]  # cycle 1 reads shard 1 again, like a run resumed there
