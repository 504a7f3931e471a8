"""Raw samples by global index for one rank or worker: a forward cursor per lane of the order, retries of a
failed `pipe:`/http read, and cuts of a shard that stays unreadable (the rest of it, for that cycle).

A skipped sample costs its tar headers only (a seek past the data for local files, a read for streams).
"""

from __future__ import annotations

import tarfile
import time

from anncli.data import shards
from anncli.data.guards import Limits
from anncli.data.manifest import is_remote
from anncli.data.order import GlobalOrder
from anncli.data.shards import DataError, log
from anncli.data.streams import open_shard

_MAX_FAILED_OPENS = 5  # shards in a row failing before their first sample: the source is unreachable
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)
_RETRY_BACKOFF_S = 0.25  # before the first retry of a failed read; doubled for each further one


class _ShardEnded(Exception):
    """The shard holds fewer samples than the manifest says."""


class _ShardCursor:
    """Reads one shard forward, sample by sample; skipped samples cost their tar headers only."""

    def __init__(self, url: str, shard: int, limits: Limits):
        self.url, self.shard, self.index, self.limits = url, shard, 0, limits
        self._file = open_shard(url)
        try:  # random access for local files: next() seeks past the data
            self._tar = tarfile.open(fileobj=self._file, mode="r|" if is_remote(url) else "r:")
            self._head = self._member()
        except BaseException:
            self._file.close()
            raise

    def _member(self):
        while True:
            info = self._tar.next()
            if info is None:
                return None
            key, field = shards.member_key(info.name)
            if info.isreg() and field is not None:
                return info, key, field

    def _sample(self, keep: bool) -> tuple[str, dict[str, bytes]]:
        if self._head is None:
            raise _ShardEnded(f"shard ended after {self.index} samples")
        key, fields = self._head[1], {}
        while self._head is not None and self._head[1] == key:
            info, _, field = self._head
            shards.check_member_name(info.name)  # checked here, not on look-ahead: the sample before is whole
            if keep:
                self.limits.check_member_size(info)
                data = self._tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"unexpected end of data in {info.name}")
                fields[field] = data
            self._head = self._member()
        self.index += 1
        return key, fields

    def read(self, member: int) -> tuple[str, dict[str, bytes]]:
        while self.index < member:
            self._sample(keep=False)
        return self._sample(keep=True)

    def close(self) -> None:
        self._tar.close()
        self._file.close()


class BadSample(Exception):
    """One global sample that cannot be used; the message says why. `quiet`: its shard's cut was warned about."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


class SampleReader:
    """Raw samples by global index for one rank or worker: forward cursors per lane; a read error of a
    `pipe:`/http shard is retried `retries` times with backoff (reopening the shard), then the shard is cut
    for the rest of that cycle."""

    def __init__(self, urls: list[str], order: GlobalOrder, limits: Limits = Limits(), retries: int = 0):
        self.urls, self.order, self.limits, self.retries = urls, order, limits, retries
        self._cursors: dict[tuple, _ShardCursor] = {}
        self._cut: dict[tuple[int, int], int] = {}  # (cycle, shard) → first sample lost to a cut or read error
        self._failed_in_row = 0  # shards failing before their first sample, with no good read between

    def fetch(self, index: int, slot: tuple | None = None) -> tuple[str, dict[str, bytes]]:
        loc = self.order.locate([index])
        cycle, shard, member, lane = (int(loc[k][0]) for k in ("cycle", "shard", "member", "lane"))
        cut = self._cut.get((cycle, shard))
        if cut is not None and member >= cut:
            raise BadSample(f"{self.urls[shard]}: sample {member} is behind the shard's cut at {cut} in cycle {cycle}",
                       quiet=True)
        slot = slot or (cycle, lane)
        retries = self.retries if is_remote(self.urls[shard]) else 0  # a local file's error is no network hiccup
        for attempt in range(retries + 1):
            try:
                sample = self._read(slot, cycle, shard, member)
                break
            except (_ShardEnded, *_READ_ERRORS) as e:
                cursor = self._cursors.pop(slot, None)
                at = cursor.index if cursor is not None and cursor.shard == shard else 0
                if cursor is not None:
                    cursor.close()
                if isinstance(e, _ShardEnded) or attempt == retries:  # a short shard is no transient error
                    self._failed(cycle, shard, at, member, e)
                log.info("reading training shard %s failed (%s); retry %d of %d", self.urls[shard], e,
                         attempt + 1, retries)
                time.sleep(_RETRY_BACKOFF_S * 2 ** attempt)
        self._failed_in_row = 0
        return sample

    def _read(self, slot: tuple, cycle: int, shard: int, member: int) -> tuple[str, dict[str, bytes]]:
        cursor = self._cursors.get(slot)
        if cursor is None or cursor.shard != shard or cursor.index > member:
            if self._cursors.pop(slot, None) is not None:
                cursor.close()
            self._drop_old(cycle)
            cursor = self._cursors[slot] = _ShardCursor(self.urls[shard], shard, self.limits)
        return cursor.read(member)

    def _failed(self, cycle: int, shard: int, cut: int, member: int, e: Exception):
        """A shard unreadable from sample `cut` on in this cycle, warned about once; shards failing in a row
        stop the run. The next cycle reads the shard again."""
        self._cut[(cycle, shard)] = cut
        url, self._failed_in_row = self.urls[shard], (self._failed_in_row + 1 if cut == 0 else 0)
        if self._failed_in_row >= min(_MAX_FAILED_OPENS, len(self.urls)):
            raise DataError(f"{self._failed_in_row} training shards in a row could not be read; the last, "
                            f"{url}: {e}") from None
        log.warning("training shard %s is cut after %d samples in cycle %d (%s); the rest of it is skipped in "
                    "this cycle", url, cut, cycle, e)
        raise BadSample(f"{url}: sample {member} unreadable: {e}") from None

    def url_of(self, index: int) -> str:
        return self.urls[int(self.order.locate([index])["shard"][0])]

    def _drop_old(self, cycle: int) -> None:
        for slot in [s for s in self._cursors if isinstance(s[0], int) and s[0] < cycle - 1]:
            self._cursors.pop(slot).close()
        for key in [k for k in self._cut if k[0] < cycle - 1]:
            del self._cut[key]

    def close(self) -> None:
        for cursor in self._cursors.values():
            cursor.close()
        self._cursors.clear()
