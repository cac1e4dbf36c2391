"""The one error hierarchy of localllm.

Core modules raise these; only ``cli.py`` turns them into a one-line message and an
exit code. Every message names the bad value and what would work instead.
"""

from __future__ import annotations

__all__ = [
    "ChecksumMismatch",
    "ContextOverflow",
    "DefaultModelMissing",
    "DownloadError",
    "DownloadInterrupted",
    "InsufficientMemory",
    "InvalidArgument",
    "InvalidModelFile",
    "LocalLLMError",
    "ModelLoadError",
    "ModelNotFound",
    "RpcError",
    "TemplateError",
]


class LocalLLMError(Exception):
    """Base class: ``str(error)`` is the one line the user sees."""

    exit_code: int = 1


class InvalidArgument(LocalLLMError):
    """A flag or argument value that cannot work (bad number, unknown name)."""

    exit_code = 2


class ModelNotFound(LocalLLMError):
    """A model reference that resolves to nothing: unknown alias, missing file."""


class DefaultModelMissing(ModelNotFound):
    """The embedded default model has not been fetched into the store yet."""


class InvalidModelFile(LocalLLMError):
    """A file that is not GGUF, is truncated, or lacks the keys we need."""


class ModelLoadError(LocalLLMError):
    """llama.cpp refused to load the model or to create its context."""


class ContextOverflow(LocalLLMError):
    """A prompt that cannot fit in the context window even on its own."""


class DownloadError(LocalLLMError):
    """A download that failed: network, hub error, disk full, offline mode."""


class ChecksumMismatch(DownloadError):
    """A downloaded file whose sha256 is not the one its source publishes."""


class DownloadInterrupted(DownloadError):
    """Ctrl-C during a download: the partial file is kept for the next pull to resume."""

    exit_code = 130


class InsufficientMemory(LocalLLMError):
    """A plan that does not fit in the memory available."""


class TemplateError(LocalLLMError):
    """A chat template that cannot be used: syntax, sandbox, budget, or none to be found."""

    exit_code = 2


class RpcError(LocalLLMError):
    """An RPC server (llama.cpp's rpc-server protocol) that cannot be reached or used."""
