"""Header-only previews of hub files: a model's facts before a byte of its weights.

``info`` and ``kv-calc`` on a hub reference that is not downloaded read only the GGUF
header over HTTP range requests: the first 1 MiB, doubling until the header and tensor
table parse.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

from localllm.errors import InvalidArgument, InvalidModelFile
from localllm.gguf.header import HeaderIncomplete
from localllm.gguf.spec import ModelSpec, read_model_spec_from_prefix
from localllm.store.hub import hub_errors, list_repo, locate_file
from localllm.store.model_store import ModelStore
from localllm.store.resolver import ResolvedModel
from localllm.text import format_bytes

__all__ = ["HeaderPreview", "header_file", "remote_header", "remote_spec"]

# The header preview starts with 1 MiB and doubles; Llama-3's header (128k tokens and
# merges) is about 8 MiB, so 64 MiB is far past any real header.
_PREVIEW_FIRST_BYTES = 1 << 20
_PREVIEW_MAX_BYTES = 64 << 20


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
    the header and tensor table parse: a few MB, never the weights.
    """
    if model.repo is None:
        raise InvalidArgument(f"{model.ref} is not a hub reference")
    store = ModelStore()
    listing = list_repo(model.repo, store)
    file = locate_file(model, listing)
    from huggingface_hub.file_download import hf_hub_url

    url = hf_hub_url(file.repo, file.path, revision=listing.revision)
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
                spec = read_model_spec_from_prefix(prefix, size or len(prefix), file.ref)
            except HeaderIncomplete:
                if (size is not None and len(prefix) >= size) or want >= _PREVIEW_MAX_BYTES:
                    raise InvalidModelFile(
                        f"{file.ref}: no complete GGUF header in its first "
                        f"{format_bytes(len(prefix))}; download it to inspect it"
                    ) from None
                want *= 2
                continue
            return HeaderPreview(spec.with_source("hub header"), prefix, size or len(prefix))


@contextmanager
def header_file(prefix: bytes, file_bytes: int, name: str = "preview.gguf") -> Iterator[Path]:
    """The header bytes in a temporary sparse file of the model's full size.

    The rest of the file is a hole that reads as zeros and takes no disk: llama.cpp's
    dry run checks every tensor against the file's size but reads none of them.
    """
    with TemporaryDirectory(prefix="localllm-header-") as tmp:
        path = Path(tmp) / name
        with path.open("wb") as fh:
            fh.write(prefix)
        os.truncate(path, max(file_bytes, len(prefix)))
        yield path
