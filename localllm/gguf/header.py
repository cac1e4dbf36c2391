"""The GGUF header walk: key/values and the tensor table, never the weights.

Follows the format gguf-py's ``GGUFReader`` reads, but hops over long arrays (the
vocabulary, merges) by their length prefixes instead of decoding them: reading the
header of any model takes milliseconds (GGUFReader: 1.9 s for SmolLM2's vocabulary).
Malformed input fails fast with an ``InvalidModelFile`` that says what is wrong.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localllm.errors import InvalidModelFile

__all__ = [
    "GGUF_MAGIC",
    "GgufHeader",
    "HeaderIncomplete",
    "LongArray",
    "TensorInfo",
    "check_magic",
    "parse_header_prefix",
    "read_header",
]

GGUF_MAGIC = b"GGUF"


def check_magic(path: Path) -> int:
    """The file size, once the file is known to start with the GGUF magic."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            magic = fh.read(4)
    except IsADirectoryError:
        raise InvalidModelFile(f"{path} is a directory, not a .gguf file") from None
    except OSError as exc:
        raise InvalidModelFile(f"cannot read {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        shown = magic.hex() if magic else "an empty file"
        raise InvalidModelFile(
            f"{path} is not a GGUF file (starts with {shown}, expected 'GGUF'); "
            "localllm runs llama.cpp's GGUF format: convert or download a .gguf"
        )
    return size


@dataclass(frozen=True)
class GgufHeader:
    """A parsed header: key/values (long arrays as their length), tensors, data offset."""

    kv: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int


class _Truncated(Exception):
    """Raised inside the header walk when a read runs past the end of the file."""


@dataclass(frozen=True)
class LongArray:
    """A big array in the header (token lists, merges): only its length is kept."""

    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int
    n_elements: int
    offset: int


# GGUF value type ids (gguf-py's GGUFValueType) -> struct format for scalars.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
                   7: "<?", 10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_TYPE_STRING, _TYPE_ARRAY = 8, 9
# Arrays longer than this are skipped, not decoded: they are vocabularies, never facts.
_MAX_DECODED_ARRAY = 4096


class _HeaderWalker:
    """A lean GGUF header reader.

    gguf-py's GGUFReader decodes every token and merge string into numpy views:
    1.9 s for SmolLM2's 49k-token vocabulary, several seconds for Llama-3's 128k.
    This walker follows the same format but hops over long arrays by their length
    prefixes, so reading the facts of any model takes milliseconds.
    """

    def __init__(self, buf: memoryview, skips: dict[int, int] | None = None) -> None:
        self.buf = buf
        self.pos = 0
        # Where each long string array ends, by where it starts: known from an earlier walk
        # of the same file, or learned by this one.
        self.skips: dict[int, int] = skips if skips is not None else {}

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        end = self.pos + length
        if end > len(self.buf):
            raise _Truncated
        raw = bytes(self.buf[self.pos : end])
        self.pos = end
        return raw.decode("utf-8", errors="replace")

    def value(self, type_id: int) -> Any:
        if type_id == _TYPE_STRING:
            return self.string()
        if type_id == _TYPE_ARRAY:
            item_type = self.take("<I")
            count = self.take("<Q")
            if count > _MAX_DECODED_ARRAY:
                self.skip_array(item_type, count)
                return LongArray(count)
            return [self.value(item_type) for _ in range(count)]
        fmt = _SCALAR_FORMATS.get(type_id)
        if fmt is None:
            raise ValueError(f"unknown GGUF value type {type_id}")
        return self.take(fmt)

    def skip_array(self, item_type: int, count: int) -> None:
        if item_type == _TYPE_STRING:
            end = self.skips.get(self.pos)
            if end is None or end > len(self.buf):
                end = self.skips[self.pos] = _skip_strings(self.buf, self.pos, count)
            self.pos = end
        elif item_type in _SCALAR_FORMATS:
            self.pos += struct.calcsize(_SCALAR_FORMATS[item_type]) * count
            if self.pos > len(self.buf):
                raise _Truncated
        else:
            for _ in range(count):  # nested arrays: rare, walk them
                self.value(item_type)


_U64 = struct.Struct("<Q")


def _skip_strings(buf: memoryview, pos: int, count: int) -> int:
    """The position after ``count`` length-prefixed strings from ``pos``.

    A vocabulary is ~50k-150k strings; each hop is one C-level unpack and one add (no
    slice, no decode, no method call): a few milliseconds for SmolLM2's 49k tokens.
    """
    unpack = _U64.unpack_from
    try:
        for _ in range(count):
            pos += 8 + unpack(buf, pos)[0]
    except struct.error:  # a length prefix past the end of the bytes
        raise _Truncated from None
    if pos > len(buf):
        raise _Truncated
    return pos


def _walk_header(buf: memoryview, label: str, skips: dict[int, int] | None = None) -> GgufHeader:
    """Key/values, tensor table and data offset from the bytes of a GGUF file's start.

    Raises ``_Truncated`` when ``buf`` ends before the header does: the caller decides
    whether that means a truncated file or that more bytes must be fetched. ``skips``
    (where long string arrays end, by start) is used and completed.
    """
    walker = _HeaderWalker(buf, skips)
    try:
        walker.take("<I")  # magic, checked already
        version = walker.take("<I")
        if version & 0xFFFF == 0:
            raise InvalidModelFile(f"{label} is a big-endian GGUF; llama.cpp needs little-endian")
        if version not in (2, 3):
            raise InvalidModelFile(f"{label} is GGUF version {version}; localllm reads 2 and 3")
        n_tensors = walker.take("<Q")
        n_kv = walker.take("<Q")
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise InvalidModelFile(
                f"{label} has an implausible header ({n_kv} keys, {n_tensors} tensors)"
            )
        kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = walker.string()
            kv[key] = walker.value(walker.take("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = walker.string()
            n_dims = walker.take("<I")
            if n_dims > 8:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            n_elements = 1
            for _ in range(n_dims):
                n_elements *= walker.take("<Q")
            type_id = walker.take("<I")
            tensors.append(TensorInfo(name, type_id, n_elements, walker.take("<Q")))
        alignment = kv.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment!r} is not a power of two")
        data_offset = -(-walker.pos // alignment) * alignment
    except (ValueError, struct.error) as exc:
        raise InvalidModelFile(f"{label} is malformed: {exc}") from None
    return GgufHeader(kv, tuple(tensors), data_offset)


# Headers already read in this process, by file identity: one command asks for the same
# file's header several times (its spec, its memory layout, its tensor table).
_READ: dict[tuple[int, int, int, int], GgufHeader] = {}
_KEEP_READ = 8


def read_header(path: Path) -> GgufHeader:
    """Key/values, tensor table and data offset of a GGUF file (mmap, weights untouched).

    Read once per process per file identity (device, inode, size, mtime): a file changed
    in place is read again. The header returned is shared: do not mutate its ``kv``.
    """
    try:
        st = path.stat()
    except OSError:
        st = None  # _read_header says what is wrong
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if st is not None else None
    if key is not None and key in _READ:
        return _READ[key]
    header = _read_header(path, key)
    if key is not None:
        if len(_READ) >= _KEEP_READ:
            _READ.pop(next(iter(_READ)))
        _READ[key] = header
    return header


def _read_header(path: Path, identity: tuple[int, int, int, int] | None) -> GgufHeader:
    kept = _kept_skips(identity)
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        buf = memoryview(mapped)
        try:
            skips = dict(kept)
            try:
                header = _walk_header(buf, str(path), skips)
            except (InvalidModelFile, _Truncated):
                if not kept:
                    raise
                skips = {}  # kept positions that do not fit this file: walk it all
                header = _walk_header(buf, str(path), skips)
        except _Truncated:
            raise InvalidModelFile(
                f"{path} is truncated (the header ends early); download it again"
            ) from None
        finally:
            buf.release()
    if identity is not None and skips != kept:
        _keep_skips(identity, skips)
    return header


# Hopping over a vocabulary is one Python step per string: ~12 ms for SmolLM2's 49k tokens
# and 49k merges, ~50 ms for Llama-3's 128k and 280k, on every run that reads the header
# (every `chat -p`). Where each array ends is kept between runs, by file identity.
_KEEP_SKIPS = 256  # files whose skips are kept (temporary files read once get one too)


def _skips_path(identity: tuple[int, int, int, int]) -> Path:
    from localllm.paths import cache_root

    return cache_root() / "gguf-skips" / ("-".join(str(n) for n in identity) + ".json")


def _kept_skips(identity: tuple[int, int, int, int] | None) -> dict[int, int]:
    from localllm.fileio import read_json_object

    if identity is None:
        return {}
    kept = read_json_object(_skips_path(identity)).get("skips")
    if not isinstance(kept, dict):
        return {}
    try:
        return {int(start): int(end) for start, end in kept.items()}
    except (TypeError, ValueError):
        return {}


def _keep_skips(identity: tuple[int, int, int, int], skips: dict[int, int]) -> None:
    from localllm.fileio import keep_newest, write_json_atomic

    path = _skips_path(identity)
    with contextlib.suppress(OSError):  # a read-only cache costs the next run the walk
        write_json_atomic(path, {"skips": {str(k): v for k, v in skips.items()}})
        keep_newest(path.parent, _KEEP_SKIPS)


class HeaderIncomplete(Exception):
    """The bytes given end before the GGUF header does: fetch more and try again."""


def parse_header_prefix(prefix: bytes, label: str) -> GgufHeader:
    """The header from the first bytes of a GGUF file (a hub file read by HTTP ranges).

    Raises :class:`HeaderIncomplete` until ``prefix`` holds the whole header and tensor table.
    """
    if len(prefix) < len(GGUF_MAGIC):
        raise HeaderIncomplete
    if prefix[: len(GGUF_MAGIC)] != GGUF_MAGIC:
        raise InvalidModelFile(
            f"{label} is not a GGUF file (starts with {bytes(prefix[:4]).hex()}, expected 'GGUF')"
        )
    buf = memoryview(prefix)
    try:
        return _walk_header(buf, label)
    except _Truncated:
        raise HeaderIncomplete from None
    finally:
        buf.release()
