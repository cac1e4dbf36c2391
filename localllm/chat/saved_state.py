"""The KV state of a saved chat session: written after each turn, loaded by ``--resume``.

A cache beside the session record (``$XDG_CACHE_HOME/localllm/kv/ID.kv`` and its header
``ID.json``): deleting it loses nothing but the time to re-read the history. Written in a
background thread once the reply is on screen (the next turn waits for it); loaded only
when its header matches this session and its tokens begin the re-rendered history.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from localllm.chat.history import kv_dir
from localllm.chat.session import ChatSession
from localllm.errors import InvalidArgument
from localllm.fileio import cached_sha256
from localllm.runtime.batch_jobs import common_prefix
from localllm.runtime.kv_state import (
    KvStateError,
    SavedState,
    StateHeader,
    library_version,
    load_seq_state,
    mismatch,
    prune_states,
    read_header,
    save_seq_state,
    state_files,
)
from localllm.text import format_bytes, parse_size

__all__ = [
    "DEFAULT_STATE_MAX",
    "ENV_STATE_MAX",
    "MIN_SHARED_TOKENS",
    "StateRestore",
    "StateWriter",
    "expected_header",
    "restore_state",
    "state_max",
]

ENV_STATE_MAX = "LOCALLLM_KV_STATE_MAX"
DEFAULT_STATE_MAX = 4 << 30  # a 7B f16 cache is ~0.5 MiB a token: a few long chats
# Below this the state shares no more than a template's opening with the history: not
# worth reading (a longer shared prefix is loaded; llama.cpp drops the cells past it).
MIN_SHARED_TOKENS = 32


def state_max(flag: str | None = None) -> int:
    """Bytes all saved states may take: --kv-state-max > $LOCALLLM_KV_STATE_MAX > 4 GiB;
    0 or "off" keeps none."""
    source = "--kv-state-max" if flag is not None else ENV_STATE_MAX
    text = flag if flag is not None else os.environ.get(ENV_STATE_MAX, "")
    if not text.strip():
        return DEFAULT_STATE_MAX
    if text.strip().lower() in ("0", "off"):
        return 0
    try:
        return parse_size(text, source)
    except InvalidArgument:
        raise InvalidArgument(
            f"{source} {text!r} is not a size; write e.g. 4GiB or 512MiB (0 or off: keep none)"
        ) from None


def expected_header(session: ChatSession) -> StateHeader:
    """What a state must have been made with to be loaded into ``session``."""
    opts = session.loaded.options
    return StateHeader(
        model_sha256=session.model_sha256 or cached_sha256(session.loaded.path),
        n_ctx=session.n_ctx,
        type_k=opts.type_k,
        type_v=opts.type_v,
        flash_attn=opts.flash_attn,
        swa_full=opts.swa_full,
        rope=session.rope_plan.as_json() if session.rope_plan is not None else None,
        template=session.chat_format.as_json(),
        library=library_version(),
    )


@dataclass(frozen=True)
class StateRestore:
    """What ``--resume`` did with the saved state."""

    tokens: int  # tokens whose cells were loaded (0: none)
    bytes: int
    seconds: float
    note: str | None  # why the history is read again instead; None when loaded


def restore_state(session: ChatSession) -> StateRestore:
    """Load the session's saved KV state if it fits; otherwise say why (never raises for a
    bad state: the history is then evaluated on the first turn, as without one)."""
    assert session.session_id is not None
    started = time.perf_counter()
    files = state_files(kv_dir(), session.session_id)
    try:
        saved = read_header(files)
        reason = mismatch(saved, expected_header(session))
        if reason is not None:
            raise KvStateError(reason)
        shared = common_prefix(saved.tokens, session.prompt_tokens(session.messages()))
        if shared < MIN_SHARED_TOKENS:
            raise KvStateError(f"it holds another conversation: {shared} tokens in common")
        loaded = load_seq_state(session.context_handle, session.seq_id, files, saved)
    except KvStateError as exc:
        why = f"saved KV state not used ({exc}): the history is read again"
        return StateRestore(0, 0, 0.0, why)
    session.loaded.engine.forget(session.seq_id, keep=loaded.tokens)
    seconds = time.perf_counter() - started  # the header, the checks, the load
    session.state_tokens, session.state_seconds = len(loaded.tokens), seconds
    return StateRestore(len(loaded.tokens), loaded.bytes, seconds, None)


class StateWriter:
    """Writes the session's KV state after a turn, in a thread; ``wait()`` before the
    context is used again (the next turn, leaving)."""

    def __init__(self, session: ChatSession, max_bytes: int) -> None:
        self.session = session
        self.max_bytes = max_bytes
        self.last: SavedState | None = None
        self.failure: str | None = None
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def start(self) -> None:
        """Write now what the context holds (nothing when it holds nothing)."""
        self.wait()
        session = self.session
        if not self.enabled or session.session_id is None or session.loaded.kv_used == 0:
            return
        ctx, tokens = session.context_handle, list(session.loaded.engine.held(session.seq_id))
        key = session.session_id
        self._thread = threading.Thread(
            target=self._write, args=(ctx, tokens, key), name="kv-state", daemon=True
        )
        self._thread.start()

    def _write(self, ctx: object, tokens: list[int], key: str) -> None:
        try:
            header = expected_header(self.session)
            seq = self.session.seq_id
            saved = save_seq_state(ctx, seq, tokens, state_files(kv_dir(), key), header)
            dropped = prune_states(kv_dir(), max_bytes=self.max_bytes)
        except (KvStateError, OSError) as exc:
            self.failure = str(exc)
            return
        if key in dropped:
            self.failure = f"it takes {format_bytes(saved.bytes)}, over --kv-state-max"
            return
        self.last = saved

    def wait(self) -> None:
        """Until the write in flight is done; Ctrl-C cannot cut it (the context must outlive it)."""
        thread, self._thread = self._thread, None
        while thread is not None and thread.is_alive():
            try:
                thread.join()
            except KeyboardInterrupt:
                continue
