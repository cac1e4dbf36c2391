"""Which file of a hub repo to download: every quant planned against this machine.

``kv-calc ORG/REPO`` and ``pull ORG/REPO`` without a quant: each GGUF model of the repo
(a split model's parts counted as one) is read from its header alone (HTTP range
requests, a few at a time, cached by file hash: :func:`localllm.store.preview.read_headers`)
and planned by llama.cpp's dry run at the context asked, as kv-calc plans one file. The
recommendation is the largest file that fits; near ties (within 5% of its size) go to a
K-quant, then to an importance-matrix variant; unquantized files (F16, BF16, F32) are
recommended only when no quantized file fits.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from localllm.errors import InsufficientMemory, InvalidArgument, InvalidModelFile, ModelNotFound
from localllm.gguf.header import parse_header_prefix
from localllm.gguf.kv_layout import layout_from_header
from localllm.machine import available_memory_bytes
from localllm.plan.facts import ModelFacts
from localllm.plan.kvcalc import FIT_SHARE, KVCalcRequest, fit_verdict, kv_calc
from localllm.runtime.params import LoadOptions
from localllm.store.hub import RepoModel, imatrix_name, list_repo, repo_models, repo_to_choose_in
from localllm.store.model_store import ModelStore
from localllm.store.preview import HeaderRead, read_headers
from localllm.text import escape_untrusted, format_bytes

__all__ = [
    "DEFAULT_CTX",
    "TIE_SHARE",
    "Progress",
    "QuantChoice",
    "QuantChoiceRequest",
    "QuantRow",
    "choice_label",
    "choose_quant",
    "is_k_quant",
    "pull_choice",
]

# The context chat, bench and serve load with when none is given.
DEFAULT_CTX = LoadOptions().n_ctx
# Files within this share of the largest that fits count as a tie.
TIE_SHARE = 0.05
_K_QUANT = re.compile(r"Q[2-6]_K(_[SML]|_XL)?")
_UNQUANTIZED = frozenset({"F16", "BF16", "F32"})

Progress = Callable[[str, int, int], None]
"""Called with (what is being done, items done, items in all)."""


def is_k_quant(quant: str | None) -> bool:
    """Q2_K .. Q6_K and their S/M/L sizes: the quants llama.cpp's own docs recommend."""
    return quant is not None and _K_QUANT.fullmatch(quant) is not None


@dataclass(frozen=True)
class QuantChoiceRequest:
    """A repo to choose a file from, at a context, with kv-calc's settings."""

    repo: str
    ctx: int | None = None  # None: DEFAULT_CTX, or the trained length when shorter
    plan: KVCalcRequest = field(default_factory=KVCalcRequest)  # KV types, batch, ubatch...


@dataclass(frozen=True)
class QuantRow:
    """One model of the repo, planned at the context asked."""

    file: str  # its path in the repo (a split model's first part)
    quant: str | None
    parts: int
    imatrix: bool
    file_bytes: int | None
    ctx: int
    weights_bytes: int | None
    kv_bytes: int | None
    compute_bytes: int | None
    total_bytes: int | None
    verdict: str  # fits | tight | too big | unknown
    max_ctx: int | None  # the largest context that fits (0: none; None: memory unknown)
    max_ctx_trained: bool  # max_ctx reached the trained length, the search's end
    kv_per_token: int | None
    source: str  # llama.cpp dry run | estimate
    error: str | None = None
    recommended: bool = False
    part_files: tuple[str, ...] = ()  # every part's path, the first first

    def as_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "quant": self.quant,
            "file_bytes": self.file_bytes,
            "parts": self.parts,
            "imatrix": self.imatrix,
            "ctx": self.ctx,
            "weights_bytes": self.weights_bytes,
            "kv_bytes": self.kv_bytes,
            "compute_bytes": self.compute_bytes,
            "total_bytes": self.total_bytes,
            "verdict": self.verdict,
            "max_ctx": self.max_ctx,
            "max_ctx_trained": self.max_ctx_trained,
            "kv_per_token": self.kv_per_token,
            "source": self.source,
            "error": self.error,
            "recommended": self.recommended,
        }


@dataclass(frozen=True)
class QuantChoice:
    """A repo's models against this machine, sorted by size, and the one to download."""

    repo: str
    revision: str
    type_k: str
    type_v: str
    batch: int
    available_bytes: int | None
    rows: tuple[QuantRow, ...]
    recommended: str | None
    reason: str
    skipped: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    headers_read: int = 0  # header files fetched over the network
    headers_cached: int = 0  # header files the cache had
    bytes_read: int = 0

    @property
    def choice(self) -> QuantRow | None:
        return next((r for r in self.rows if r.recommended), None)

    def as_json(self) -> dict[str, object]:
        return {
            "repo": self.repo,
            "revision": self.revision,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "batch": self.batch,
            "available_bytes": self.available_bytes,
            "fit_share": FIT_SHARE,
            "files": [r.as_json() for r in self.rows],
            "recommended": self.recommended,
            "reason": self.reason,
            "skipped": list(self.skipped),
            "warnings": list(self.warnings),
            "headers": {"read": self.headers_read, "cached": self.headers_cached,
                        "bytes_read": self.bytes_read},
        }  # fmt: skip


def _facts(model: RepoModel, reads: list[HeaderRead]) -> ModelFacts:
    """The model's facts from its parts' headers (the first holds the architecture)."""
    first = reads[0]
    spec = first.spec()
    if len(reads) > 1:  # every part's tensors count: the later parts' data regions
        more = sum(r.data_bytes for r in reads[1:])
        spec = replace(
            spec,
            weights_bytes=(spec.weights_bytes or 0) + more if spec.weights_bytes else None,
            file_bytes=sum(r.file_bytes for r in reads),
            n_params=None,
        )
    shards = tuple((r.file.filename, r.prefix, r.file_bytes) for r in reads)
    return ModelFacts(
        label=model.path,
        spec=spec,
        source="hub header",
        weights_bytes=spec.weights_bytes,
        weights_note="GGUF tensor table",
        layout=layout_from_header(parse_header_prefix(first.prefix, model.path).kv),
        header=first.prefix,
        shards=shards if len(reads) > 1 else (),
    )


def _imatrix(model: RepoModel, read: HeaderRead | None) -> bool:
    if imatrix_name(model.path):
        return True
    if read is None:
        return False
    kv = parse_header_prefix(read.prefix, model.path).kv
    return any(key.startswith("quantize.imatrix.") for key in kv)


def _plan_row(
    model: RepoModel, facts: ModelFacts, request: QuantChoiceRequest, available: int | None
) -> tuple[QuantRow, tuple[str, ...]]:
    """The row at the context asked, and the largest context that fits (two kv-calc runs)."""
    trained = facts.spec.n_ctx_train
    ctx = request.ctx or (min(DEFAULT_CTX, trained) if trained else DEFAULT_CTX)
    base = replace(request.plan, model=None, ctx=(ctx,), budget_bytes=None, rope=None)
    at_ctx = kv_calc(base, facts)
    row = at_ctx.rows[0]
    max_ctx, capped = None, False
    if available is not None:
        # The row's own K/V types: the budget search would otherwise sweep every type.
        budget = replace(base, ctx=(), kv_types=(), type_k=row.type_k, type_v=row.type_v,
                         budget_bytes=int(available * FIT_SHARE))  # fmt: skip
        solved = kv_calc(budget, facts).budget[0]
        max_ctx, capped = solved.max_ctx, solved.capped
    quant = model.quant or facts.spec.file_type
    return QuantRow(
        file=model.path, quant=quant, parts=len(model.parts), imatrix=False,
        file_bytes=model.size_bytes, ctx=ctx, weights_bytes=row.weights_bytes,
        kv_bytes=row.kv_bytes, compute_bytes=row.compute_bytes, total_bytes=row.total_bytes,
        verdict=fit_verdict(row.total_bytes, available), max_ctx=max_ctx,
        max_ctx_trained=capped, kv_per_token=at_ctx.per_token_bytes, source=at_ctx.plan_source,
        part_files=tuple(p.path for p in model.parts),
    ), at_ctx.warnings  # fmt: skip


def _error_row(model: RepoModel, error: str, ctx: int) -> QuantRow:
    return QuantRow(
        file=model.path, quant=model.quant, parts=len(model.parts), imatrix=False,
        file_bytes=model.size_bytes, ctx=ctx, weights_bytes=None, kv_bytes=None,
        compute_bytes=None, total_bytes=None, verdict="unknown", max_ctx=None,
        max_ctx_trained=False, kv_per_token=None, source="none", error=error,
        part_files=tuple(p.path for p in model.parts),
    )  # fmt: skip


def choice_label(row: QuantRow) -> str:
    """``Q4_K_M (model.Q4_K_M.gguf)``: the quant and the file name, escaped."""
    name = escape_untrusted(row.file.rsplit("/", 1)[-1], 80)
    return f"{row.quant} ({name})" if row.quant else name


def _recommend(rows: list[QuantRow], available: int | None) -> tuple[QuantRow | None, str]:
    """The largest file that fits; near ties to a K-quant, then to an imatrix variant."""
    planned = [r for r in rows if r.error is None and r.total_bytes is not None]
    if available is None:
        return None, "available memory unknown here; set LOCALLLM_AVAILABLE_MEMORY (e.g. 16GiB)"
    if not planned:
        return None, "no file of the repo could be planned"
    ctx = planned[0].ctx
    fitting = [r for r in planned if r.verdict == "fits"]
    quantized = [r for r in fitting if r.quant not in _UNQUANTIZED]
    pool = quantized or fitting
    room = f"{format_bytes(available)} available"
    if not pool:
        small = min(planned, key=lambda r: r.total_bytes or 0)
        more = f"; it fits {small.max_ctx} tokens" if small.max_ctx else ""
        return None, (
            f"none of the {len(planned)} files fits {ctx} tokens in {room} (a plan fits below "
            f"{FIT_SHARE:.0%}); the smallest, {choice_label(small)}, needs "
            f"{format_bytes(small.total_bytes)}{more}"
        )
    largest = max(pool, key=lambda r: (r.file_bytes or 0, r.file))
    near = [r for r in pool if (r.file_bytes or 0) >= (largest.file_bytes or 0) * (1 - TIE_SHARE)]
    best = max(near, key=lambda r: (is_k_quant(r.quant), r.imatrix, r.file_bytes or 0, r.file))
    reason = (
        f"at {ctx} tokens it needs {format_bytes(best.total_bytes)} of the {room}, the "
        f"largest of {len(planned)} files that fits"
    )
    if best is not largest:
        why = (
            "a K-quant"
            if is_k_quant(best.quant) and not is_k_quant(largest.quant)
            else ("an importance-matrix quant")
        )
        reason += f" ({why}, within {TIE_SHARE:.0%} of {choice_label(largest)})"
    if len(quantized) < len(fitting):
        reason += "; unquantized files are left to those who ask for them"
    return best, reason


def choose_quant(request: QuantChoiceRequest, progress: Progress | None = None) -> QuantChoice:
    """Plan every model of ``request.repo`` from its header; recommend the one to download."""
    listing = list_repo(request.repo, ModelStore())
    repo = listing.repo
    if not listing.files:
        raise ModelNotFound(f"{repo} has no .gguf files; localllm runs GGUF models only")
    models, skipped = repo_models(listing)
    if not models:
        raise ModelNotFound(
            f"{repo} has no GGUF model to run; its .gguf files: {'; '.join(skipped)}"
        )
    files = [p for m in models for p in m.parts]
    heads = read_headers(
        files,
        listing.revision,
        (lambda d, t: progress("reading headers", d, t)) if progress else None,
    )
    available = available_memory_bytes()
    rows: list[QuantRow] = []
    warnings: list[str] = []
    default_ctx = request.ctx or DEFAULT_CTX
    for i, model in enumerate(models):
        if progress is not None:
            progress("planning", i, len(models))
        reads = [heads[p.path] for p in model.parts]
        bad = next((r for r in reads if isinstance(r, InvalidModelFile)), None)
        if bad is not None:
            rows.append(_error_row(model, str(bad), default_ctx))
            continue
        good = [r for r in reads if isinstance(r, HeaderRead)]
        try:
            facts = _facts(model, good)
        except InvalidModelFile as exc:  # a header that parses but is not a model's
            rows.append(_error_row(model, str(exc), default_ctx))
            continue
        row, row_warnings = _plan_row(model, facts, request, available)
        rows.append(replace(row, imatrix=_imatrix(model, good[0])))
        warnings.extend(w for w in row_warnings if w not in warnings)
    if progress is not None:
        progress("planning", len(models), len(models))
    best, reason = _recommend(rows, available)
    rows = [replace(r, recommended=r is best) for r in rows]
    reads = [r for r in heads.values() if isinstance(r, HeaderRead)]
    type_k, type_v = _types(request)
    return QuantChoice(
        repo=repo, revision=listing.revision, type_k=type_k, type_v=type_v,
        batch=request.plan.batch[0], available_bytes=available,
        rows=tuple(rows), recommended=best.file if best else None, reason=reason,
        skipped=skipped, warnings=tuple(warnings),
        headers_read=sum(1 for r in reads if r.bytes_read),
        headers_cached=sum(1 for r in reads if not r.bytes_read),
        bytes_read=sum(r.bytes_read for r in reads),
    )  # fmt: skip


def _types(request: QuantChoiceRequest) -> tuple[str, str]:
    plan = request.plan
    base = plan.kv_types[0] if plan.kv_types else "f16"
    return plan.type_k or base, plan.type_v or base


def pull_choice(
    ref: str, ctx: int | None = None, progress: Progress | None = None
) -> QuantChoice | None:
    """``pull ORG/REPO`` without a quant: the choice among the repo's files (None when
    ``ref`` names one file already). Raises when none fits, with how to pull one anyway."""
    repo = repo_to_choose_in(ref)
    if repo is None:
        if ctx is not None:
            raise InvalidArgument(
                f"--ctx {ctx} chooses among a repo's files; {ref} names one file already "
                "(give org/repo without a quant to choose)"
            )
        return None
    choice = choose_quant(QuantChoiceRequest(repo, ctx), progress)
    if choice.choice is None:
        planned = [r for r in choice.rows if r.error is None] or list(choice.rows)
        small = min(planned, key=lambda r: r.file_bytes or 0)
        anyway = f"{repo}:{small.quant}" if small.quant else f"hf://{repo}/{small.file}"
        raise InsufficientMemory(
            f"{choice.repo}: {choice.reason}; pull one anyway by name: localllm pull {anyway}"
        )
    return choice
