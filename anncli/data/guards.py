"""What one shard may cost before it is read: caps on a tar member's bytes and an image's pixels (read from
the tar header and the PNG/JPEG header, never by decoding), and compressed tars refused by name."""

from __future__ import annotations

import struct
import tarfile
from dataclasses import dataclass

from anncli.errors import UserError
from anncli.recipe import DataConfig


class SampleError(Exception):
    """One sample that cannot be used; the message says why."""


@dataclass(frozen=True)
class Limits:
    """What one sample may cost once read: bytes of a tar member, pixels of a decoded image or label
    (`data.max_member_mb`, `data.max_pixels`), checked from the tar header and the image header."""

    max_member_mb: int = DataConfig.model_fields["max_member_mb"].default
    max_pixels: int = DataConfig.model_fields["max_pixels"].default

    @classmethod
    def of(cls, data: DataConfig) -> "Limits":
        return cls(data.max_member_mb, data.max_pixels)

    def check_member(self, info: tarfile.TarInfo) -> None:
        if info.size > self.max_member_mb << 20:
            raise tarfile.ReadError(f"member {info.name} holds {info.size / 2**20:.0f} MB, over data.max_member_mb="
                                    f"{self.max_member_mb} (raise it with --set data.max_member_mb=N)")

    def check_pixels(self, field: str, data: bytes) -> None:
        size = header_size(data)
        if size and size[0] * size[1] > self.max_pixels:
            raise SampleError(f"{field} is {size[0]}x{size[1]} pixels, over data.max_pixels={self.max_pixels} "
                              "(raise it with --set data.max_pixels=N)")


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header, read before any decoding; None for other bytes."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    i = 2 if data[:2] == b"\xff\xd8" else len(data)
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:  # fill byte or a marker without length
            i += 1 if marker == 0xFF else 2
            continue
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


_COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip"), b"BZh": ("bzip2", "bunzip2"), b"\xfd7zXZ\x00": ("xz", "unxz"),
               b"\x28\xb5\x2f\xfd": ("zstd", "unzstd")}


class CompressedShard(UserError):
    """A compressed tar given as a shard: refused by name (members are counted and sized as plain tar)."""


class Prefixed:
    """A stream whose first bytes were read already to look at them: they are handed out again first."""

    def __init__(self, head: bytes, stream):
        self._head, self._stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(n)
        if 0 <= n < len(self._head):
            out, self._head = self._head[:n], self._head[n:]
            return out
        out, self._head = self._head, b""
        return out + self._stream.read(-1 if n < 0 else n - len(out))

    def __enter__(self) -> "Prefixed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stream.close()


def refuse_compressed(url: str, head: bytes) -> None:
    kind, tool = next((named for magic, named in _COMPRESSED.items() if head.startswith(magic)), (None, None))
    if kind:
        raise CompressedShard(f"{url}: a {kind}-compressed tar; shards are plain .tar files (their images are "
                              f"compressed already): decompress it first (`{tool} FILE`)")
