"""The hub: repo listings, which file a reference names, and its errors as one line.

Every request goes through huggingface-hub (its HTTP session, ``HF_ENDPOINT``,
``HF_TOKEN``, ``HF_HUB_OFFLINE``, proxies): :mod:`localllm.store.pull` downloads through it and
:mod:`localllm.store.preview` reads headers through it. This module knows what a repo holds
(``pull --list``), which GGUF file a reference names, and turns every hub or network
failure into one line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from localllm.errors import DownloadError, InvalidArgument, ModelNotFound
from localllm.store.model_store import ModelStore
from localllm.store.resolver import ResolvedModel, resolve_model

__all__ = [
    "SHA256_PATTERN",
    "HubFile",
    "PullResult",
    "RepoListing",
    "RepoModel",
    "hub_errors",
    "imatrix_name",
    "list_repo",
    "list_repo_files",
    "locate_file",
    "quant_of",
    "repo_models",
    "repo_to_choose_in",
    "select_file",
    "split_part",
]

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
# llama.cpp's split files (llama_split_path): NAME-00001-of-00003.gguf.
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.I)
# An importance-matrix quant as repos name it: Model.i1-Q4_K_M.gguf, Model-Q4_K_M-imat.gguf.
_IMATRIX = re.compile(r"(?<![A-Za-z0-9])(i1|imat|imatrix)(?![A-Za-z0-9])", re.I)
_MMPROJ = re.compile(r"(?<![A-Za-z0-9])mmproj(?![A-Za-z0-9])", re.I)
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
    stem = filename.rsplit("/", 1)[-1]
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    found = _QUANT.findall(stem)
    return found[-1].upper() if found else None


def split_part(path: str) -> tuple[str, int, int] | None:
    """(the model's path without the part, part number, part count) of a split file."""
    match = _SPLIT.match(path)
    if match is None:
        return None
    return match["stem"], int(match["no"]), int(match["count"])


def imatrix_name(path: str) -> bool:
    """Whether a file name says it was quantized with an importance matrix (i1, imat)."""
    stem = path.rsplit("/", 1)[-1]
    return bool(_IMATRIX.search(stem[:-5] if stem.lower().endswith(".gguf") else stem))


@dataclass(frozen=True)
class RepoModel:
    """One model of a repo: a GGUF file, or the parts of a split one (in order)."""

    parts: tuple[HubFile, ...]

    @property
    def path(self) -> str:
        return self.parts[0].path

    @property
    def size_bytes(self) -> int | None:
        sizes = [p.size_bytes for p in self.parts]
        return None if None in sizes else sum(s or 0 for s in sizes)

    @property
    def quant(self) -> str | None:
        return self.parts[0].quant or quant_of(self.path.rsplit("/", 1)[0])


def repo_models(listing: RepoListing) -> tuple[tuple[RepoModel, ...], tuple[str, ...]]:
    """The models a repo's GGUF files make (split parts counted as one), and the files left
    out with why: vision projectors, importance matrices, a split with parts missing."""
    models: list[RepoModel] = []
    skipped: list[str] = []
    splits: dict[tuple[str, int], dict[int, HubFile]] = {}
    for file in listing.files:
        if _MMPROJ.search(file.filename):
            skipped.append(f"{file.path} (a vision projector, not a model)")
            continue
        if imatrix_name(file.filename) and file.quant is None:  # imatrix.gguf: the data
            skipped.append(f"{file.path} (an importance matrix, not a model)")
            continue
        part = split_part(file.path)
        if part is None:
            models.append(RepoModel((file,)))
        else:
            splits.setdefault((part[0], part[2]), {})[part[1]] = file
    for (stem, count), parts in splits.items():
        if sorted(parts) != list(range(1, count + 1)):
            skipped.append(f"{stem} (a split of {count} parts, {len(parts)} on the hub)")
            continue
        models.append(RepoModel(tuple(parts[n] for n in range(1, count + 1))))
    models.sort(key=lambda m: (m.size_bytes or 0, m.path))
    return tuple(models), tuple(skipped)


def repo_to_choose_in(ref: str, store: ModelStore | None = None) -> str | None:
    """The hub repo ``ref`` names without a quant (``org/repo``): a file is to be chosen.

    None for anything else (a quant, a hub file, a catalog alias, a path).
    """
    if "/" not in ref or ref.startswith("hf://") or ref.endswith(".gguf"):
        return None
    model = resolve_model(ref, store)
    if model.kind != "hub" or model.quant is not None or model.repo is None:
        return None
    return model.repo


# ------------------------------------------------------------------------------ errors


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_page(repo: str) -> str:
    return f"{_endpoint()}/{repo}"


@contextmanager
def hub_errors(repo: str, what: str) -> Iterator[None]:
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


def list_repo(repo: str, store: ModelStore) -> RepoListing:
    """The GGUF files of ``repo`` on its main branch, with sizes and LFS hashes."""
    from huggingface_hub import HfApi

    with hub_errors(repo, "its file listing"):
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
    return list_repo(repo, store)


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


def locate_file(model: ResolvedModel, listing: RepoListing) -> HubFile:
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
