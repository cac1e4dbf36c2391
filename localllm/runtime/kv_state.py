"""A sequence's KV cells saved to disk and loaded back, so a conversation resumes without
re-reading its history.

llama.cpp writes the cells (``llama_state_seq_save_file``) and reads them back
(``llama_state_seq_load_file``). Beside each state file a small JSON header says what it
was made with (model sha256, context, KV types, flash attention, RoPE, template, library
version), the tokens it covers, and the state file's size and sha256. Nothing reaches
llama.cpp until the header matches and the file is whole: llama.cpp trusts the lengths
inside a state file, so a truncated or damaged one could make it abort. Writes go to a
temp file, fsync, rename; the header comes last and names the state's sha256, so a kill
-9 at any point leaves the previous pair, or a pair that disagrees (and is not trusted).

Everything here takes a raw ``llama_context`` pointer, a sequence id and token ids; the
two adapters at the end bind it to llama-cpp-python's ``Llama``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from localllm.errors import LocalLLMError

__all__ = [
    "STATE_FORMAT",
    "KvStateError",
    "LoadedState",
    "SavedState",
    "StateFiles",
    "StateHeader",
    "library_version",
    "load_seq_state",
    "mismatch",
    "prune_states",
    "read_header",
    "remove_state",
    "save_seq_state",
    "state_files",
    "tokens_sha256",
]

STATE_FORMAT = "localllm-kv-state/1"
# llama.h: LLAMA_STATE_SEQ_MAGIC ('ggsq') and LLAMA_STATE_SEQ_VERSION at the pinned commit.
_SEQ_MAGIC = 0x67677371
_SEQ_VERSION = 3
_CHUNK = 8 << 20
# The fields that must equal the running session's for the cells to mean the same thing.
_IDENTITY = (
    "model_sha256",
    "n_ctx",
    "type_k",
    "type_v",
    "flash_attn",
    "swa_full",
    "rope",
    "template",
    "library",
)


class KvStateError(LocalLLMError):
    """A saved state that cannot be used (the caller re-reads the history instead)."""


@dataclass(frozen=True)
class StateHeader:
    """What a state file was made with and what it holds (the JSON beside it)."""

    model_sha256: str
    n_ctx: int
    type_k: str
    type_v: str
    flash_attn: bool
    swa_full: bool
    rope: dict[str, Any] | None
    template: dict[str, Any] | None
    library: str  # llama-cpp-python's version: its llama.cpp writes and reads the cells
    seq_id: int = 0
    tokens: tuple[int, ...] = ()
    tokens_sha256: str = ""
    state_bytes: int = 0
    state_sha256: str = ""
    saved_at: float = field(default=0.0)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokens"] = list(self.tokens)
        return {"format": STATE_FORMAT, **data}


@dataclass(frozen=True)
class StateFiles:
    """The pair of files of one saved state."""

    state: Path
    header: Path

    @property
    def bytes(self) -> int:
        total = 0
        for path in (self.state, self.header):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total


@dataclass(frozen=True)
class SavedState:
    files: StateFiles
    n_tokens: int
    bytes: int
    seconds: float  # the whole write: llama.cpp's save, fsync, hash, header


@dataclass(frozen=True)
class LoadedState:
    tokens: tuple[int, ...]
    bytes: int
    seconds: float  # checks (hash included) and llama.cpp's load


def library_version() -> str:
    """llama-cpp-python's version: the llama.cpp that writes and reads the cells."""
    from importlib.metadata import version

    return version("llama_cpp_python")


def state_files(directory: Path, key: str) -> StateFiles:
    return StateFiles(directory / f"{key}.kv", directory / f"{key}.json")


def tokens_sha256(tokens: Sequence[int]) -> str:
    return hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_header(path: Path, header: StateHeader) -> None:
    text = json.dumps(header.as_json(), separators=(",", ":")) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_seq_state(
    ctx: Any, seq_id: int, tokens: Sequence[int], files: StateFiles, header: StateHeader
) -> SavedState:
    """Write sequence ``seq_id``'s cells (covering ``tokens``) and their header, atomically.

    ``header`` carries the identity fields; the tokens, sizes and hashes are filled here.
    Raises KvStateError when llama.cpp or the disk refuses (the previous pair then stays).
    """
    import llama_cpp

    started = time.perf_counter()
    directory = files.state.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{files.state.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        array = (llama_cpp.llama_token * max(len(tokens), 1))(*tokens)
        written = llama_cpp.llama_state_seq_save_file(
            ctx, str(tmp).encode(), seq_id, array, len(tokens)
        )
        if written == 0 or tmp.stat().st_size != written:
            raise KvStateError(f"llama.cpp could not write the KV state to {tmp}")
        os.chmod(tmp, 0o600)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        digest = _sha256_file(tmp)
        full = StateHeader(
            **{
                **asdict(header),
                "seq_id": seq_id,
                "tokens": tuple(int(t) for t in tokens),
                "tokens_sha256": tokens_sha256(tokens),
                "state_bytes": int(written),
                "state_sha256": digest,
                "saved_at": time.time(),
            }
        )
        os.replace(tmp, files.state)
        # The header last: until it lands, the old header names the old state's sha256.
        _write_header(files.header, full)
        _fsync_dir(directory)
    except OSError as exc:
        raise KvStateError(f"cannot write the KV state: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return SavedState(files, len(tokens), int(written), time.perf_counter() - started)


def read_header(files: StateFiles) -> StateHeader:
    """The header of a saved state; KvStateError when missing or not one of ours."""
    try:
        raw = json.loads(files.header.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KvStateError("none on disk") from None
    except (OSError, ValueError) as exc:
        raise KvStateError(f"its header cannot be read ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
        raise KvStateError("its header is not a localllm KV state header")
    try:
        raw.pop("format")
        raw["tokens"] = tuple(int(t) for t in raw.get("tokens") or ())
        header = StateHeader(**raw)
    except (TypeError, ValueError):
        raise KvStateError("its header is damaged") from None
    if len(header.tokens) == 0 or tokens_sha256(header.tokens) != header.tokens_sha256:
        raise KvStateError("its header's token list is damaged")
    return header


def mismatch(saved: StateHeader, expected: StateHeader) -> str | None:
    """The first identity field that differs, said as "saved with X, now Y"; None if all match."""
    for name in _IDENTITY:
        was, now = getattr(saved, name), getattr(expected, name)
        if was != now:
            if name == "model_sha256":
                return "it was saved with another model file"
            return f"it was saved with {name} {was!r}, this session has {now!r}"
    return None


def _check_file(files: StateFiles, header: StateHeader) -> None:
    """Size, llama.cpp's magic and version, token count, then the sha256: before llama.cpp."""
    try:
        size = files.state.stat().st_size
        with files.state.open("rb") as fh:
            head = fh.read(12)
    except OSError:
        raise KvStateError("its state file is missing") from None
    if size != header.state_bytes:
        raise KvStateError(f"its state file is {size} bytes, {header.state_bytes} were written")
    if len(head) < 12 or struct.unpack("<3I", head) != (
        _SEQ_MAGIC,
        _SEQ_VERSION,
        len(header.tokens),
    ):
        raise KvStateError("its state file does not start as llama.cpp's sequence state")
    if _sha256_file(files.state) != header.state_sha256:
        raise KvStateError("its state file is damaged (sha256 differs)")


def load_seq_state(ctx: Any, seq_id: int, files: StateFiles, header: StateHeader) -> LoadedState:
    """Check the file against ``header`` (read and matched by the caller), then load its
    cells into ``seq_id`` (cleared first). KvStateError leaves ``seq_id`` empty."""
    import llama_cpp

    started = time.perf_counter()
    _check_file(files, header)
    memory = llama_cpp.llama_get_memory(ctx)
    llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
    capacity = len(header.tokens)
    out = (llama_cpp.llama_token * capacity)()
    count = ctypes.c_size_t(0)
    read = llama_cpp.llama_state_seq_load_file(
        ctx, str(files.state).encode(), seq_id, out, capacity, ctypes.byref(count)
    )
    tokens = tuple(int(t) for t in out[: count.value])
    if read == 0 or tokens != header.tokens:
        llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
        raise KvStateError("llama.cpp refused the state file")
    return LoadedState(tokens, header.state_bytes, time.perf_counter() - started)


def remove_state(files: StateFiles) -> None:
    for path in (files.header, files.state):
        path.unlink(missing_ok=True)


def _pairs(directory: Path) -> list[tuple[str, StateFiles, float]]:
    """(key, files, last write) for each state in ``directory``, newest first."""
    if not directory.is_dir():
        return []
    keys = {p.stem for p in directory.iterdir() if p.suffix in (".kv", ".json")}
    rows = []
    for key in keys:
        files = state_files(directory, key)
        stamps = []
        for path in (files.state, files.header):
            with contextlib.suppress(OSError):
                stamps.append(path.stat().st_mtime)
        rows.append((key, files, max(stamps, default=0.0)))
    return sorted(rows, key=lambda row: (row[2], row[0]), reverse=True)


def prune_states(
    directory: Path,
    *,
    max_bytes: int | None = None,
    keep_keys: set[str] | None = None,
    stale_seconds: float = 3600.0,
) -> list[str]:
    """Drop states whose key is not in ``keep_keys``, then the oldest until the rest fit
    ``max_bytes``, and temp files a killed write left (older than ``stale_seconds``).
    Returns the keys dropped."""
    dropped = []
    total = 0
    for key, files, _ in _pairs(directory):
        size = files.bytes
        if (keep_keys is not None and key not in keep_keys) or (
            max_bytes is not None and total + size > max_bytes
        ):
            remove_state(files)
            dropped.append(key)
            continue
        total += size
    now = time.time()
    if directory.is_dir():
        for tmp in directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > stale_seconds:
                    tmp.unlink()
    return dropped
