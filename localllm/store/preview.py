"""Header-only previews of hub files: a model's facts before a byte of its weights.

``info`` and ``kv-calc`` on a hub reference that is not downloaded read only the GGUF
header over HTTP range requests: the first 1 MiB, doubling until the header and tensor
table parse. Headers are cached by the file's LFS sha256 under ``cache_root()/hub-headers``
(the header alone, compressed), so a second look reads nothing; :func:`read_headers`
reads a repo's files a few at a time.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

from localllm.errors import InvalidArgument, InvalidModelFile
from localllm.fileio import keep_newest
from localllm.gguf.header import HeaderIncomplete, parse_header_prefix
from localllm.gguf.spec import ModelSpec, read_model_spec_from_prefix
from localllm.paths import cache_root
from localllm.store.hub import HubFile, hub_errors, list_repo, locate_file
from localllm.store.model_store import ModelStore
from localllm.store.resolver import ResolvedModel
from localllm.text import format_bytes

__all__ = [
    "HEADER_WORKERS",
    "HeaderPreview",
    "HeaderRead",
    "cached_header",
    "fetch_header",
    "header_cache_dir",
    "header_file",
    "header_files",
    "read_headers",
    "remote_header",
    "remote_spec",
]

# The header preview starts with 1 MiB and doubles; Llama-3's header (128k tokens and
# merges) is about 8 MiB, so 64 MiB is far past any real header.
_PREVIEW_FIRST_BYTES = 1 << 20
_PREVIEW_MAX_BYTES = 64 << 20
# Kept headers: every quant previewed leaves one (Llama-3's is ~8 MiB before zlib).
_KEEP_HEADERS, _KEEP_HEADER_BYTES = 1024, 256 << 20
# Header reads in flight at once: a repo's 20 files in a few round trips, politely.
HEADER_WORKERS = 4


def _read_range(url: str, start: int, stop: int) -> tuple[bytes, int | None]:
    """Bytes [start, stop) of a hub file through huggingface-hub's session; and its size."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = {**build_hf_headers(), "Range": f"bytes={start}-{stop - 1}"}
    chunks: list[bytes] = []
    got = 0
    # Stream, so a server that ignores Range costs only the bytes we read, not the file.
    with get_session().stream("GET", url, headers=headers) as response:
        hf_raise_for_status(response)
        total: int | None = None
        content_range = response.headers.get("Content-Range")
        if response.status_code == 206 and content_range:
            total = int(content_range.rsplit("/", 1)[-1])
            skip = 0
        else:  # a 200: the whole file from byte 0
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
            skip = start
        for chunk in response.iter_bytes(1 << 16):
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            chunks.append(chunk)
            got += len(chunk)
            if got >= stop - start:
                break
    return b"".join(chunks)[: stop - start], total


@dataclass(frozen=True)
class HeaderPreview:
    """A hub file's header bytes (its first bytes, whole header included) and facts."""

    spec: ModelSpec
    prefix: bytes
    file_bytes: int


def remote_spec(model: ResolvedModel) -> ModelSpec:
    """Architecture facts of a hub file that is not here, from its header alone."""
    return remote_header(model).spec


def remote_header(model: ResolvedModel) -> HeaderPreview:
    """The header of a hub file that is not here, and the facts it gives.

    Reads the first MiB of the file with an HTTP range request, then twice as much until
    the header and tensor table parse: a few MB, never the weights. A header read before
    (the same file hash) comes from the cache and reads nothing.
    """
    if model.repo is None:
        raise InvalidArgument(f"{model.ref} is not a hub reference")
    store = ModelStore()
    listing = list_repo(model.repo, store)
    file = locate_file(model, listing)
    read = cached_header(file, listing.revision)
    return HeaderPreview(read.spec(), read.prefix, read.file_bytes)


@dataclass(frozen=True)
class HeaderRead:
    """A hub file's header bytes (to the data offset) and how many bytes reading them
    took (0: from the cache). A split model's later parts hold tensors, no facts."""

    file: HubFile
    prefix: bytes = field(repr=False)
    file_bytes: int
    bytes_read: int

    def spec(self) -> ModelSpec:
        """The model's facts (a whole model's header, or a split model's first part)."""
        spec = read_model_spec_from_prefix(self.prefix, self.file_bytes, self.file.ref)
        return spec.with_source("hub header")

    @property
    def data_bytes(self) -> int:
        """What follows the header: the tensors (with their alignment padding)."""
        return max(self.file_bytes - len(self.prefix), 0)


def fetch_header(file: HubFile, revision: str) -> HeaderRead:
    """The header of ``file`` over HTTP range requests: 1 MiB, then doubling."""
    from huggingface_hub.file_download import hf_hub_url

    url = hf_hub_url(file.repo, file.path, revision=revision)
    prefix = b""
    size = file.size_bytes
    want = _PREVIEW_FIRST_BYTES
    with hub_errors(file.repo, file.path):
        while True:
            stop = min(want, size) if size else want
            if stop > len(prefix):
                more, total = _read_range(url, len(prefix), stop)
                size = size or total
                prefix += more
            try:
                header = parse_header_prefix(prefix, file.ref)
            except HeaderIncomplete:
                if (size is not None and len(prefix) >= size) or want >= _PREVIEW_MAX_BYTES:
                    raise InvalidModelFile(
                        f"{file.ref}: no complete GGUF header in its first "
                        f"{format_bytes(len(prefix))}; download it to inspect it"
                    ) from None
                want *= 2
                continue
            kept = prefix[: header.data_offset]  # the header alone: the rest is weights
            return HeaderRead(file, kept, size or len(prefix), len(prefix))


# ------------------------------------------------------------------------ header cache


def header_cache_dir() -> Path:
    """Where hub headers are kept, one file per LFS sha256 (the same bytes, any repo)."""
    return cache_root() / "hub-headers"


def _cached(file: HubFile) -> HeaderRead | None:
    if file.sha256 is None or file.size_bytes is None:
        return None
    path = header_cache_dir() / f"{file.sha256}.gguf.z"
    try:
        prefix = zlib.decompress(path.read_bytes())
        parse_header_prefix(prefix, file.ref)
    except (OSError, zlib.error, HeaderIncomplete, InvalidModelFile):
        return None  # absent, or damaged: read it again
    with suppress(OSError):
        os.utime(path)  # used now: the bound below drops the least recently used first
    return HeaderRead(file, prefix, file.size_bytes, 0)


def _keep(read: HeaderRead) -> None:
    file = read.file
    if file.sha256 is None or file.size_bytes is None:
        return
    folder = header_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.sha256[:16]}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(zlib.compress(read.prefix, 1))  # vocabularies shrink ~3x
        os.replace(tmp, folder / f"{file.sha256}.gguf.z")
        keep_newest(folder, _KEEP_HEADERS, "*.gguf.z", max_bytes=_KEEP_HEADER_BYTES)
    except OSError:  # a cache that cannot be written costs a re-read, nothing more
        Path(tmp).unlink(missing_ok=True)


def cached_header(file: HubFile, revision: str) -> HeaderRead:
    """The header of ``file``: from the cache by its sha256, else read and cached."""
    cached = _cached(file)
    if cached is not None:
        return cached
    read = fetch_header(file, revision)
    _keep(read)
    return read


def read_headers(
    files: Sequence[HubFile],
    revision: str,
    progress: Callable[[int, int], None] | None = None,
    workers: int = HEADER_WORKERS,
) -> dict[str, HeaderRead | InvalidModelFile]:
    """The headers of ``files`` (by path), ``workers`` at a time; cached ones read nothing.

    A file whose bytes are not a GGUF header maps to its error; a hub or network
    failure raises (one line) and cancels the reads still waiting.
    """
    done: dict[str, HeaderRead | InvalidModelFile] = {}
    if progress is not None:
        progress(0, len(files))
    if not files:
        return done
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(files))))
    try:
        futures = {pool.submit(cached_header, f, revision): f for f in files}
        for future in as_completed(futures):
            try:
                done[futures[future].path] = future.result()
            except InvalidModelFile as exc:
                done[futures[future].path] = exc
            if progress is not None:
                progress(len(done), len(files))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return done


@contextmanager
def header_file(prefix: bytes, file_bytes: int, name: str = "preview.gguf") -> Iterator[Path]:
    """The header bytes in a temporary sparse file of the model's full size.

    The rest of the file is a hole that reads as zeros and takes no disk: llama.cpp's
    dry run checks every tensor against the file's size but reads none of them.
    """
    with header_files([(name, prefix, file_bytes)]) as path:
        yield path


@contextmanager
def header_files(parts: Sequence[tuple[str, bytes, int]]) -> Iterator[Path]:
    """Each (file name, header bytes, size) as a sparse file in one temporary folder;
    yields the first. A split model's shards keep their names: llama.cpp finds the
    others beside the first by them."""
    with TemporaryDirectory(prefix="localllm-header-") as tmp:
        paths = []
        for name, prefix, file_bytes in parts:
            path = Path(tmp) / Path(name).name
            with path.open("wb") as fh:
                fh.write(prefix)
            os.truncate(path, max(file_bytes, len(prefix)))
            paths.append(path)
        yield paths[0]
