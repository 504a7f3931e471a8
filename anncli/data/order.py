"""The training sample order: a pure function of (seed, global index, manifest), whatever the world size.

Design (cycles of lanes). The manifest gives shard URLs and per-shard sample counts, N samples in all.
- Cycle c covers global indices [c·N, (c+1)·N) and visits every sample exactly once (an exact epoch).
  Its shards are permuted with a generator seeded by (seed, c) and their samples concatenated in that
  order into one sequence of N positions.
- The sequence is cut into K contiguous lanes of ⌊N/K⌋ or ⌈N/K⌉ positions; position i of the cycle
  is taken from lane i mod K, at lane offset i div K. Consecutive indices therefore come from K places
  spread over the whole (permuted) data set, one lane after the other, and each lane is read strictly
  forward through its shards: no random access, so `pipe:` and http shards work; a reader skips the
  members that are not its own by reading tar headers only (a seek for local files), never decoding.
  Mixing: a batch of E consecutive indices draws from min(E, K) distinct lanes, in a fresh shard
  order every cycle, on top of the packer's in-shard shuffle. Today's resampled stream draws each
  sample from one of 16 open shards picked at random; K = 16 lanes matches that, exact epochs beat
  sampling with replacement (no sample is seen twice before every sample was seen once).
- Global micro-batch u is indices [u·b·W, (u+1)·b·W) (b = per-rank batch, W = world size); rank r takes
  its b consecutive indices of it; optimizer step s is micro-batches [s·A, (s+1)·A) (A = accumulation
  steps), i.e. global indices [s·E, (s+1)·E) with E = b·W·A. Any (b, W, A) with the same E gives the
  same global batches in the same global order.
- A bad sample (undecodable, or lost to a truncated shard) is replaced by a substitute drawn from the
  same cycle with a generator seeded by (seed, index, attempt): a pure function too, so every world
  size that meets the same bad sample uses the same substitute, and cross-world equality holds.
"""

from __future__ import annotations

import hashlib
import json
import numpy as np

_MASK = (1 << 63) - 1
_SHARDS, _SUBSTITUTE, AUGMENT = 11, 12, 13  # generator purposes


class GlobalOrder:
    """Where every global sample index lives: (cycle, shard, member, lane)."""

    def __init__(self, counts: list[int], *, seed: int, lanes: int = 16):
        if not counts or any(c < 0 for c in counts) or sum(counts) == 0:
            raise ValueError("the manifest holds no samples")
        if lanes < 1:
            raise ValueError("lanes must be at least 1")
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        self.seed, self.lanes = int(seed), int(lanes)
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def fingerprint(self) -> dict:
        """What fixes the order: resuming with another fingerprint would change it."""
        digest = hashlib.sha256(json.dumps(self.counts.tolist()).encode()).hexdigest()[:16]
        return {"seed": self.seed, "lanes": self.lanes, "samples": self.total, "shards": len(self.counts),
                "counts_sha256": digest}

    def _cycle(self, cycle: int) -> tuple[np.ndarray, np.ndarray]:
        """Cycle `cycle`'s shard permutation and the cumulative sample counts along it."""
        if cycle not in self._layouts:
            if len(self._layouts) >= 4:
                self._layouts.pop(next(iter(self._layouts)))
            perm = np.random.default_rng([self.seed & _MASK, cycle, _SHARDS]).permutation(len(self.counts))
            self._layouts[cycle] = perm, np.cumsum(self.counts[perm])
        return self._layouts[cycle]

    def _lane_start(self, lane: np.ndarray) -> np.ndarray:
        base, extra = divmod(self.total, self.lanes)
        return lane * base + np.minimum(lane, extra)

    def locate(self, indices) -> dict[str, np.ndarray]:
        """Arrays cycle, shard, member, lane, lane_pos for global indices (no I/O)."""
        g = np.asarray(indices, dtype=np.int64).reshape(-1)
        if (g < 0).any():
            raise ValueError("global sample indices are non-negative")
        cycle, i = np.divmod(g, self.total)
        lane, offset = np.mod(i, self.lanes), i // self.lanes
        pos = self._lane_start(lane) + offset
        shard, member = np.empty_like(g), np.empty_like(g)
        for c in np.unique(cycle):
            sel = cycle == c
            perm, ends = self._cycle(int(c))
            k = np.searchsorted(ends, pos[sel], side="right")
            shard[sel] = perm[k]
            member[sel] = pos[sel] - (ends[k] - self.counts[perm[k]])
        return {"cycle": cycle, "shard": shard, "member": member, "lane": lane, "lane_pos": pos}

    def substitute(self, index: int, attempt: int) -> int:
        """The global index whose sample stands in for bad sample `index` (attempt 0, 1, … after failures):
        another index of the same cycle, never `index` itself when the cycle has more than one sample."""
        cycle = index // self.total
        rng = np.random.default_rng([self.seed & _MASK, index, attempt, _SUBSTITUTE])
        pick = int(rng.integers(self.total - 1)) if self.total > 1 else 0
        pick += int(self.total > 1 and pick >= index % self.total)
        return cycle * self.total + pick

    def augment_rng(self, index: int) -> np.random.Generator:
        """The generator of every augmentation decision for the sample at global index `index`."""
        return np.random.default_rng([self.seed & _MASK, int(index), AUGMENT])


# ---------------------------------------------------------------- how a step is split over ranks


def check_split(effective_batch: int, world_size: int, batch_size: int) -> int:
    """Accumulation steps A with b·W·A = E; ValueError when there is no integer split."""
    if batch_size < 1 or world_size < 1 or effective_batch % (batch_size * world_size):
        raise ValueError(f"effective batch {effective_batch} is not a multiple of per-rank batch {batch_size} "
                         f"x {world_size} ranks")
    return effective_batch // (batch_size * world_size)


def choose_split(effective_batch: int, world_size: int, batch_size: int, position: int = 0) -> tuple[int, int, str]:
    """(per-rank batch, accumulation steps, a sentence saying why) keeping `effective_batch` on `world_size`
    ranks: the recipe's per-rank batch when it divides, else the largest smaller one that does (it fits in
    memory too); ValueError when E is not a multiple of the world size. `position` (the global sample a
    resumed stream starts at) must be a multiple of the micro-batch b·W too."""
    for b in range(min(batch_size, effective_batch // world_size), 0, -1):
        if effective_batch % (b * world_size) == 0 and position % (b * world_size) == 0:
            accum = effective_batch // (b * world_size)
            why = "the recipe's per-rank batch" if b == batch_size else f"per-rank batch lowered from {batch_size}"
            return b, accum, f"{b} x {world_size} ranks x {accum} accumulation step(s) = {effective_batch} ({why})"
    if effective_batch % world_size or not position:
        raise ValueError(f"effective batch {effective_batch} cannot be split evenly over {world_size} ranks")
    raise ValueError(f"the data stream stopped at global sample {position}, which {world_size} ranks cannot continue "
                     "from (a micro-batch of b x ranks must divide it)")


def rank_indices(micro_batch: int, *, rank: int, world_size: int, batch_size: int) -> range:
    """Global indices of this rank's part of global micro-batch `micro_batch`."""
    start = micro_batch * batch_size * world_size + rank * batch_size
    return range(start, start + batch_size)


def step_indices(step: int, effective_batch: int) -> range:
    """Global indices of optimizer step `step`'s global batch, in global order."""
    return range(step * effective_batch, (step + 1) * effective_batch)


# ---------------------------------------------------------------- the sample trace


def global_keys(parts: list[tuple[list[int], list[str]]]) -> list[str]:
    """Keys of a global batch in global order from every rank's (indices, keys) of it."""
    pairs = sorted((i, k) for indices, keys in parts for i, k in zip(indices, keys))
    if len({i for i, _ in pairs}) != len(pairs):
        raise ValueError("two ranks report the same global sample index")
    return [k for _, k in pairs]


def samples_sha256(keys: list[str]) -> str:
    """The `samples_sha256` trace: SHA-256 of the keys in global order joined by newlines."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def gather_samples_sha256(indices: list[int], keys: list[str]) -> str | None:
    """Collective: every rank passes the (global index, key) pairs it trained on in one optimizer step;
    rank 0 gets the step's `samples_sha256`, the others None. One all_gather_object of E/W short keys
    per traced step (computing the other ranks' keys from the order would mean reading their tar headers)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return samples_sha256(global_keys([(indices, keys)]))
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (list(indices), list(keys)))
    return samples_sha256(global_keys(parts)) if dist.get_rank() == 0 else None
