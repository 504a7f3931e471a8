"""The world-size-independent sample order: same global batches on 1, 2 or 4 ranks, 0 or 2 workers, after
resume, over uneven and broken shards; skipping ahead decodes nothing."""

import logging

import numpy as np
import pytest
import torch

from anncli.data import global_stream
from anncli.data.global_stream import GlobalStream
from anncli.data.order import GlobalOrder, global_keys, samples_sha256, step_indices
from anncli.data.shards import ShardWriter
from anncli.data.synth import _encode_png, make_sample
from anncli.errors import UserError
from anncli.recipe import AugmentConfig

AUG = AugmentConfig(crop=(24, 40), scale=(0.5, 1.5), photometric="mmseg", brightness_delta=32)
E = 8  # effective batch
STEPS = 5
SPLITS = {1: 4, 2: 2, 4: 2}  # world size → per-rank batch (accumulation 2, 2, 1)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _write(folder, prefix, counts, rng, damage=None):
    """Shards of the given sample counts; `damage(i, members)` may break sample i. → (urls, counts)."""
    urls, i = [], 0
    for s, count in enumerate(counts):
        writer = ShardWriter(folder, f"{prefix}{s}", max_count=10**6, max_size=1 << 40)
        for _ in range(count):
            image, label, _ = make_sample(rng, 32, 64)
            members = {"img.png": _encode_png(image), "seg.png": _encode_png(label)}
            if damage:
                damage(i, members)
            writer.write(f"k{i:04d}", members)
            i += 1
        writer.close()
        urls.append(str(folder / f"{prefix}{s}-000000.tar"))
    return urls, list(counts)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # uneven: 7 shards of 3 to 17 samples, 64 in all
    return _write(tmp_path_factory.mktemp("order"), "u", [9, 17, 3, 11, 5, 13, 6], np.random.default_rng(5))


def _stream(urls, counts, world=1, rank=0, workers=0, batch=None, **kw):
    return GlobalStream(urls, counts, augment=AUG, batch_size=batch or SPLITS[world], effective_batch=E, seed=3,
                        rank=rank, world_size=world, num_workers=workers, lanes=4, **kw)


def _take(stream, n):
    it = iter(stream)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _run(urls, counts, world, workers, steps=STEPS, state=None):
    """{step: {global index: (key, image, label)}} from every rank of a world."""
    out = {}
    for rank in range(world):
        s = _stream(urls, counts, world, rank, workers)
        if state is not None:
            s.load_state_dict(state)
        first = s.next_micro_batch // s.accum_steps
        for n, b in enumerate(_take(s, steps * s.accum_steps)):
            step = first + n // s.accum_steps
            for j, (i, k) in enumerate(zip(b["indices"], b["keys"])):
                out.setdefault(step, {})[i] = (k, b["image"][j], b["label"][j])
    return out


def _trace(per_step):
    return {step: samples_sha256(global_keys([(list(d), [d[i][0] for i in d])])) for step, d in per_step.items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for step in a:
        assert sorted(a[step]) == list(step_indices(step, E))
        assert a[step].keys() == b[step].keys()
        for i in a[step]:
            ka, ia, la = a[step][i]
            kb, ib, lb = b[step][i]
            assert ka == kb and torch.equal(ia, ib) and torch.equal(la, lb), (step, i)


def test_order_is_exact_epochs_of_forward_lanes():
    counts = [9, 17, 3, 11, 5, 13, 6]
    order = GlobalOrder(counts, seed=3, lanes=4)
    n = sum(counts)
    for cycle in range(3):
        loc = order.locate(range(cycle * n, (cycle + 1) * n))
        pairs = set(zip(loc["shard"].tolist(), loc["member"].tolist()))
        assert len(pairs) == n and pairs == {(s, m) for s, c in enumerate(counts) for m in range(c)}
        for lane in range(4):  # every lane moves forward: shard by shard, member by member
            sel = loc["lane"] == lane
            assert np.all(np.diff(loc["lane_pos"][sel]) == 1)
    a, b = order.locate(range(n)), order.locate(range(n, 2 * n))
    assert not np.array_equal(a["shard"], b["shard"])  # a new shard order every cycle
    again = GlobalOrder(counts, seed=3, lanes=4).locate([5, 500, 70])
    assert all(np.array_equal(again[k], order.locate([5, 500, 70])[k]) for k in again)
    assert order.substitute(70, 0) != 70 and order.substitute(70, 0) // n == 70 // n


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [2, 4])
def test_every_world_sees_the_same_global_batches(data, world, workers):
    reference = _run(*data, world=1, workers=0)
    got = _run(*data, world=world, workers=workers)
    _assert_same(reference, got)
    assert _trace(reference) == _trace(got)
    keys = [reference[s][i][0] for s in range(STEPS) for i in sorted(reference[s])]
    assert len(set(keys[:64])) == min(64, len(keys))  # no sample twice within a cycle


def test_one_rank_with_workers_matches_without(data):
    _assert_same(_run(*data, world=1, workers=0), _run(*data, world=1, workers=2))


def test_a_state_saved_with_one_worker_count_resumes_with_another(data):
    """Why data.num_workers is a RESUME_SAFE_KEY: the position does not depend on the worker count."""
    full = _run(*data, world=2, workers=0, steps=STEPS + 3)
    for saved, resumed in ((2, 0), (0, 2)):
        s = _stream(*data, world=2, rank=0, workers=saved)
        _take(s, 3 * s.accum_steps)
        _assert_same({k: full[k] for k in range(3, 3 + STEPS)},
                     _run(*data, world=2, workers=resumed, steps=STEPS, state=s.state_dict()))


@pytest.mark.parametrize("saved_world,resumed_world,workers", [(2, 2, 0), (2, 1, 2), (1, 4, 0)])
def test_resume_from_state_continues_the_order(data, saved_world, resumed_world, workers):
    full = _run(*data, world=1, workers=0, steps=STEPS + 3)
    states = []
    for rank in range(saved_world):
        s = _stream(*data, world=saved_world, rank=rank, workers=workers)
        _take(s, 3 * s.accum_steps)
        states.append(s.state_dict())
    assert all(st == {**states[0], "seen": st["seen"], "skipped": st["skipped"]} for st in states)
    assert states[0]["next_sample"] == 3 * E
    resumed = _run(*data, world=resumed_world, workers=workers, steps=STEPS, state=states[0])
    _assert_same({s: full[s] for s in range(3, 3 + STEPS)}, resumed)


def test_seeking_far_ahead_decodes_only_the_batch_handed_out(data, monkeypatch):
    calls = []
    real = global_stream.decode_sample
    monkeypatch.setattr(global_stream, "decode_sample", lambda k, f, *limits: calls.append(k) or real(k, f, *limits))
    s = _stream(*data, world=2, rank=1)
    s.seek_step(1000)  # 8000 samples ahead: 125 cycles
    (batch,) = _take(s, 1)
    assert len(calls) == 2 and batch["indices"] == [8002, 8003]
    ref = _stream(*data, world=1)
    ref.seek_step(1000)
    (whole,) = _take(ref, 1)
    assert whole["keys"][2:4] == batch["keys"] and torch.equal(whole["image"][2:4], batch["image"])


def test_state_of_another_order_or_split_is_refused(data):
    s = _stream(*data)
    _take(s, 3)  # 1.5 steps: 12 samples
    with pytest.raises(UserError, match="not a multiple"):
        _stream(*data, world=1, batch=8).load_state_dict(s.state_dict())
    other = GlobalStream(*data, augment=AUG, batch_size=4, effective_batch=E, seed=4, rank=0, world_size=1, lanes=4)
    with pytest.raises(UserError, match="data order"):
        other.load_state_dict(s.state_dict())
    with pytest.raises(UserError, match="not a multiple of per-rank batch 3 x 2 ranks"):
        _stream(*data, world=2, batch=3)


def test_faults_get_the_same_substitutes_on_every_world(tmp_path, caplog):
    def damage(i, members):
        if i == 4:
            members["img.png"] = b"\x89PNG\r\n\x1a\n not a png"

    urls, counts = _write(tmp_path, "b", [12, 10, 14], np.random.default_rng(9), damage)
    data = open(urls[1], "rb").read()
    open(urls[1], "wb").write(data[: len(data) // 2])  # about 5 of its 10 samples survive the cut
    n = sum(counts)
    with caplog.at_level(logging.WARNING, logger="anncli.data"):
        reference = _run(urls, counts, world=1, workers=0, steps=2 * n // E)
    cut_warnings = [r for r in caplog.records if "is cut after" in r.getMessage()]
    assert len(cut_warnings) == 2 and all(urls[1] in w.getMessage() for w in cut_warnings)  # once per cycle
    for world, workers in ((2, 0), (4, 2)):
        _assert_same(reference, _run(urls, counts, world=world, workers=workers, steps=2 * n // E))
    piped = [f"pipe:cat {u}" for u in urls]  # a stream finds the cut where a seek does
    _assert_same(reference, _run(piped, counts, world=2, workers=0, steps=2 * n // E))
    keys = [reference[s][i][0] for s in reference for i in sorted(reference[s])]
    assert "k0004" not in keys and not any(f"k{i:04d}" in keys for i in range(12 + 6, 22))
    assert len(keys) == 2 * n  # every slot was filled, bad ones by substitutes
    s = _stream(urls, counts, world=1, max_skip_fraction=1.0)
    _take(s, n // 4)
    # one cycle: 6 bad samples (1 undecodable, 5 behind the cut), plus any substitute that was bad too
    assert s.samples_skipped >= 6 and s.samples_seen == n + s.samples_skipped


def test_pipe_sources_read_forward_and_match_local_files(data):
    urls, counts = data
    piped = [f"pipe:cat {u}" for u in urls]
    _assert_same(_run(urls, counts, world=1, workers=0, steps=3), _run(piped, counts, world=2, workers=2, steps=3))


def _trace_worker(out: str) -> None:
    import torch.distributed as dist

    from anncli.data.order import gather_samples_sha256

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    indices = list(range(rank * 3, rank * 3 + 3))
    digest = gather_samples_sha256(indices, [f"k{i}" for i in indices])
    if rank == 0:
        with open(out, "w") as f:
            f.write(digest)
    else:
        assert digest is None
    dist.destroy_process_group()


def test_the_gathered_trace_equals_the_single_process_one(tmp_path):
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()),
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    elastic_launch(cfg, entrypoint=_trace_worker)(str(tmp_path / "trace"))
    want = samples_sha256([f"k{i}" for i in range(6)])
    assert (tmp_path / "trace").read_text() == want
    assert want == __import__("hashlib").sha256(b"k0\nk1\nk2\nk3\nk4\nk5").hexdigest()


def test_readers_share_no_lane_when_they_divide_the_lane_count():
    """b·W·workers dividing K: every lane is read by exactly one (rank, worker), so streams are not read twice."""
    from anncli.data.order import rank_indices

    order = GlobalOrder([100] * 30, seed=1, lanes=16)
    b, world, workers = 1, 4, 4
    n = order.total
    for cycle in range(2):
        owners = {}
        first, last = cycle * n // (b * world), (cycle + 1) * n // (b * world)
        for u in range(first, last):
            for rank in range(world):
                g = [i for i in rank_indices(u, rank=rank, world_size=world, batch_size=b) if i // n == cycle]
                for lane in order.locate(g)["lane"].tolist() if g else []:
                    owners.setdefault(lane, set()).add((rank, u % workers))
        assert len(owners) == 16 and all(len(o) == 1 for o in owners.values())


def test_choose_split_keeps_the_effective_batch():
    from anncli.data.order import choose_split

    assert choose_split(8, 8, 1)[:2] == (1, 1)
    assert choose_split(8, 4, 1)[:2] == (1, 2)  # Cityscapes 8x1 on 4 ranks: accumulate 2
    assert choose_split(16, 4, 2)[:2] == (2, 2)
    assert choose_split(16, 8, 4)[:2] == (2, 1) and "lowered from 4" in choose_split(16, 8, 4)[2]
    assert choose_split(12, 2, 4)[:2] == (3, 2)
    for e, w in ((8, 16), (16, 3)):
        with pytest.raises(ValueError, match=f"cannot be split evenly over {w} ranks"):
            choose_split(e, w, 1)
