"""Speculative decoding's pure parts: n-gram drafts, the accept rule, when a draft pays.

No llama_cpp here: the batch engine (:mod:`~localllm.runtime.batch_engine`) puts the
drafted tokens in its batch and calls these.

- :class:`NgramIndex` is prompt lookup (llama.cpp's ngram-mod is the same idea with a
  fixed-size hash table): the last ``n`` tokens of prompt + reply map to where they last
  occurred, and the tokens that followed them there are the draft.
- :func:`verify_draft` is the acceptance rule: each position's token is SAMPLED from the
  target's own chain (argmax at temperature 0), and a draft token is accepted only when
  it equals that sample. The reply is therefore distributed exactly as without drafts.
- :class:`DecodeCost` and :class:`DraftPolicy` decide how many tokens to draft: a decode
  of ``n`` tokens costs about ``a + b*n`` seconds, so one more drafted token pays when
  the chance it is accepted times the time a generated token costs exceeds ``b``.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from localllm.errors import InvalidArgument

__all__ = [
    "FIRST_DRAFT",
    "FORCED_DRAFT",
    "MAX_DRAFT",
    "SPEC_MODES",
    "DecodeCost",
    "DraftPolicy",
    "NgramIndex",
    "Verified",
    "check_spec_mode",
    "verify_draft",
]

SPEC_MODES = ("auto", "off", "ngram")
MAX_DRAFT = 32  # tokens drafted for one slot in one step at most
FORCED_DRAFT = 16  # --spec ngram: the draft length whatever acceptance says
FIRST_DRAFT = 4  # a request's first drafts (and probes) are short: they may all be wrong
NGRAM_SIZES = (8, 3)  # the longer match is tried first: it predicts better
MIN_BACKOFF, MAX_BACKOFF = 4, 256  # generated tokens without drafts after a losing draft


def check_spec_mode(mode: str, draft: str | None = None) -> str:
    """``--spec``'s value, checked against ``--draft`` (InvalidArgument in one line)."""
    if mode not in SPEC_MODES:
        raise InvalidArgument(f"--spec {mode!r} is not one of: {', '.join(SPEC_MODES)}")
    if draft is not None and mode != "auto":
        raise InvalidArgument(
            f"--draft drafts with a model, --spec {mode} says otherwise; drop one of them"
        )
    return mode


class NgramIndex:
    """Where each n-gram of a token history last occurred (the position after it).

    The history starts with the prompt; a draft whose source lies after it is the reply
    repeating its own words, which is a different bet from copying the prompt (see
    :class:`DraftPolicy`)."""

    def __init__(self, sizes: Sequence[int] = NGRAM_SIZES, prompt: Sequence[int] = ()) -> None:
        self.sizes = tuple(sorted(sizes, reverse=True))
        self.tokens: list[int] = []
        self._tables: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.extend(prompt)
        self.prompt_len = len(prompt)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        # The n-gram that ends just before this token is now known to be followed by it.
        t = self.tokens
        t.append(token)
        end = len(t) - 1
        for n, table in self._tables.items():
            if end >= n:
                table[tuple(t[end - n : end])] = end

    def _source(self) -> int | None:
        """Where the draft would start: after the longest n-gram matching the tail."""
        t = self.tokens
        for n, table in self._tables.items():
            if len(t) < n:
                continue
            at = table.get(tuple(t[len(t) - n :]))
            if at is not None:
                return at
        return None

    def draft(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the longest n-gram matching the tail."""
        at = self._source() if limit > 0 else None
        return [] if at is None else self.tokens[at : at + limit]

    def echoes_reply(self) -> bool:
        """Whether the next draft would come from the reply's own text, not the prompt."""
        at = self._source()
        return at is not None and at >= self.prompt_len


@dataclass(frozen=True)
class Verified:
    """What one verification kept: the sampled tokens, of which ``accepted`` were drafts."""

    tokens: tuple[int, ...]  # every sample taken, in order (the last one is not decoded yet)
    accepted: int  # leading draft tokens equal to their sample (their KV cells stay)


def verify_draft(draft: Sequence[int], sample: Callable[[int], int | None]) -> Verified:
    """The accept/reject rule. ``sample(i)`` samples position ``i`` (0: after the last
    decoded token, i: after draft token i-1) from the target's own chain, or returns
    None when the reply ended there. Drafts are accepted while they equal the sample."""
    out: list[int] = []
    accepted = 0
    for i in range(len(draft) + 1):
        token = sample(i)
        if token is None:
            break
        out.append(token)
        if i < len(draft) and token == draft[i]:
            accepted += 1
            continue
        break
    return Verified(tuple(out), accepted)


class DecodeCost:
    """Seconds per llama_decode as ``a + b * n_tokens``, fitted on recent decodes whose
    tokens all want logits (as drafted ones do: the output layer is a large share).

    Theil-Sen (the median of pairwise slopes), so the odd decode that a busy machine
    stretched three-fold does not decide how long drafts are."""

    WINDOW = 48  # recent decodes kept
    REFIT = 8  # decodes between two fits

    def __init__(self) -> None:
        self._recent: deque[tuple[int, float]] = deque(maxlen=self.WINDOW)
        self._since = 0
        self._fit: tuple[float, float] | None = None

    def observe(self, n_tokens: int, seconds: float) -> None:
        if n_tokens > 256 or seconds <= 0:
            return
        self._recent.append((n_tokens, seconds))
        self._since += 1
        if self._fit is None or self._since >= self.REFIT:
            self._since = 0
            self._fit = self._theil_sen()

    @property
    def known(self) -> bool:
        return self._fit is not None

    def _theil_sen(self) -> tuple[float, float] | None:
        pts = list(self._recent)
        slopes = [
            (t2 - t1) / (n2 - n1)
            for i, (n1, t1) in enumerate(pts)
            for n2, t2 in pts[i + 1 :]
            if n2 != n1
        ]
        if not slopes:
            return None
        b = statistics.median(slopes)
        a = statistics.median(t - b * n for n, t in pts)
        return a, b

    def coefficients(self) -> tuple[float, float]:
        """(a, b): fixed and per-token seconds; (1, 1/8) in relative units until known."""
        if self._fit is None:
            return 1.0, 0.125
        a, b = self._fit
        # Guard the fit: a decode is never free, an extra token never gains time.
        a = max(a, 1e-6)
        return a, min(max(b, a / 256), a * 4)


@dataclass
class DraftPolicy:
    """One request's acceptance record and how long its next draft may be.

    Acceptance is modelled as geometric: each drafted token is accepted with chance
    ``p`` while the ones before it were. The length cap doubles while whole drafts are
    accepted and starts again from :data:`FIRST_DRAFT` at a rejection: a draft rejected
    part-way is where the copied text ended (an edit), and how long the next copy runs
    is not known. When recent drafts (a decaying average) saved less time than verifying
    them cost, drafting backs off for a while, doubling each time, then probes again."""

    forced: bool = False  # --spec ngram: draft whatever it costs
    drafted: int = 0
    accepted: int = 0
    # Copies of the prompt (and a draft model's drafts): a prior of 9 accepted for 1
    # rejected, p = 0.9; against 0.75 it gained on copies and cost nothing on free chat
    # once echoes had their own record (benchmarks/speculative.md, change 3).
    _hits: float = 9.0
    _misses: float = 1.0
    _pause: int = 0  # tokens to generate before drafting again
    _backoff: int = MIN_BACKOFF
    _cap: int = FIRST_DRAFT  # doubles while whole drafts are accepted, restarts when not
    _gain: float = 2.0  # recent drafts' time saved, in generated tokens (decaying average)
    # Drafts from the reply's own text (NgramIndex.echoes_reply) keep their own record:
    # replaying the benchmark's replies, a draft copied from the prompt was accepted for
    # 6-14 tokens on average, one where the reply repeats itself for 1-2 (free chat).
    _echo_hits: float = 1.0  # a prior of 1 accepted for 1 rejected: p = 0.5
    _echo_misses: float = 1.0
    _echo: bool = False  # the draft last sized echoes the reply

    @property
    def p(self) -> float:
        """The chance a drafted token is accepted, for the kind of draft last sized."""
        if self._echo:
            return self._echo_hits / (self._echo_hits + self._echo_misses)
        return self._hits / (self._hits + self._misses)

    def length(self, cost: DecodeCost, generating: int, echo: bool = False) -> int:
        """How many tokens to draft now, with ``generating`` slots in the step; ``echo``:
        the draft would come from the reply's own text."""
        if self.forced:
            return FORCED_DRAFT
        self._echo = echo
        if self._pause > 0:
            self._pause -= 1
            if self._pause == 0:  # then probe again, as if acceptance were middling
                self._hits, self._misses = max(self._hits, 1.0), min(self._misses, 1.0)
                self._echo_hits = max(self._echo_hits, 1.0)
                self._echo_misses = min(self._echo_misses, 1.0)
                self._gain = 0.5  # one more loss pauses again, for twice as long
            return 0
        a, b = cost.coefficients()
        per_token = (a + b * generating) / generating  # what a generated token costs now
        ratio, p = b / per_token, self.p
        if p <= ratio:
            if not echo:  # (a losing echo is only skipped: a copy may still come)
                self._pause, self._backoff = self._backoff, min(self._backoff * 2, MAX_BACKOFF)
            return 0
        # Token i pays while p**i > b / per_token.
        return min(self._cap, max(1, int(math.log(ratio) / math.log(p))))

    def record(self, n_drafted: int, n_accepted: int, cost: DecodeCost, generating: int) -> None:
        self.drafted += n_drafted
        self.accepted += n_accepted
        missed = 1 if n_accepted < n_drafted else 0
        if self._echo:
            self._echo_hits = self._echo_hits * 0.9 + n_accepted
            self._echo_misses = self._echo_misses * 0.9 + missed
        else:
            self._hits = self._hits * 0.9 + n_accepted
            self._misses = self._misses * 0.9 + missed
        if self.forced:
            return
        if n_accepted == n_drafted:
            self._cap = min(self._cap * 2, MAX_DRAFT)
        else:
            self._cap = FIRST_DRAFT
        a, b = cost.coefficients()
        per_token = (a + b * generating) / generating
        gained = n_accepted - b * n_drafted / per_token  # tokens' worth of time
        self._gain = self._gain * 0.8 + gained
        if self._gain < 0:  # drafting has been losing time lately: stop for a while
            self._pause, self._backoff = self._backoff, min(self._backoff * 2, MAX_BACKOFF)
        elif gained > 0:
            self._backoff = MIN_BACKOFF
