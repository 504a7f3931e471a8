"""What one shard may cost before it is read: caps on a tar member's bytes and an image's pixels (read from
the tar header and the image header, never by decoding), and compressed tars refused by name."""

from __future__ import annotations

import io
import struct
import tarfile
import warnings
from dataclasses import dataclass

from PIL import Image

from anncli.errors import UserError
from anncli.recipe import DataConfig


class SampleError(Exception):
    """One sample that cannot be used; the message says why."""


def hw_text(hw) -> str:
    """A size as every option takes it: height x width (`hw` is (h, w, …), e.g. an array's shape)."""
    return f"{hw[0]}x{hw[1]}"


@dataclass(frozen=True)
class Limits:
    """What one sample may cost once read: bytes of a tar member, pixels of a decoded image or label
    (`data.max_member_mb`, `data.max_pixels`), checked from the tar header and the image header."""

    max_member_mb: int = DataConfig.model_fields["max_member_mb"].default
    max_pixels: int = DataConfig.model_fields["max_pixels"].default

    @classmethod
    def of(cls, data: DataConfig) -> "Limits":
        return cls(data.max_member_mb, data.max_pixels)

    def check_member_size(self, info: tarfile.TarInfo) -> None:
        if info.size > self.max_member_mb << 20:
            raise tarfile.ReadError(f"member {info.name} holds {info.size / 2**20:.0f} MB, over data.max_member_mb="
                                    f"{self.max_member_mb} (raise it with --set data.max_member_mb=N)")

    def check_pixels(self, field: str, data: bytes) -> tuple[int, int]:
        """(height, width) of an image field from its header; SampleError when it is over `max_pixels` or
        when no header reader knows the bytes (they are never handed to a decoder unsized)."""
        raise_it = "(raise it with --set data.max_pixels=N)"
        try:
            hw = header_hw(data)
        except Image.DecompressionBombError:
            most = 2 * Image.MAX_IMAGE_PIXELS
            over = f"over data.max_pixels={self.max_pixels} {raise_it}" if most >= self.max_pixels else \
                "more than PIL sizes: store it as PNG or JPEG"
            raise SampleError(f"{field} has more than {most:,} pixels by its header, {over}") from None
        if hw is None:
            raise SampleError(f"{field} is not a readable image ({describe_bytes(data)}; no header gives its "
                              "size)")
        if hw[0] * hw[1] > self.max_pixels:
            raise SampleError(f"{field} is {hw_text(hw)} pixels (HxW), over data.max_pixels={self.max_pixels} "
                              + raise_it)
        return hw


def describe_bytes(data: bytes) -> str:
    return f"{len(data)} bytes, starts {data[:8].hex(' ')}" if data else "empty"


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_hw(data: bytes) -> tuple[int, int] | None:
    """(height, width) from an image's header, read before any decoding: PNG and JPEG here, every other
    format PIL knows (WebP, TIFF, BMP, GIF, PNM, JPEG 2000, …) by PIL's header reader, whatever the field's
    name says; None when no reader knows the bytes. PIL raises DecompressionBombError past its own cap."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        ok = data[12:16] == b"IHDR" and len(data) >= 24
        return struct.unpack(">II", data[16:24])[::-1] if ok else None
    if data[:2] == b"\xff\xd8":
        hw = _jpeg_hw(data)
        if hw is not None:
            return hw
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # sized, not decoded: our cap decides
            with Image.open(io.BytesIO(data)) as im:
                return im.size[1], im.size[0]
    except Image.DecompressionBombError:
        raise
    except Exception:  # PIL raises many kinds on bytes it does not know
        return None


def _jpeg_hw(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:  # fill byte or a marker without length
            i += 1 if marker == 0xFF else 2
            continue
        if marker in _JPEG_SOF:
            return struct.unpack(">HH", data[i + 5:i + 9])
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


_COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip"), b"BZh": ("bzip2", "bunzip2"), b"\xfd7zXZ\x00": ("xz", "unxz"),
               b"\x28\xb5\x2f\xfd": ("zstd", "unzstd")}


class CompressedShard(UserError):
    """A compressed tar given as a shard: refused by name (members are counted and sized as plain tar)."""


def refuse_compressed(url: str, head: bytes) -> None:
    kind, tool = next((named for magic, named in _COMPRESSED.items() if head.startswith(magic)), (None, None))
    if kind:
        raise CompressedShard(f"{url}: a {kind}-compressed tar; shards are plain .tar files (their images are "
                              f"compressed already): decompress it first (`{tool} FILE`)")
