"""Chat sessions kept on disk after every turn, so a crash or kill -9 loses no completed turn.

One JSON file per session in ``$XDG_STATE_HOME/localllm/sessions/`` (mode 0600, written
atomically), holding the messages, the settings, the model reference and its sha256 (from
the store's record: never a re-hash per turn). ``chat --resume [ID]`` reads one back; the
newest :data:`KEEP_SESSIONS` are kept. A session's saved KV state (``chat/saved_state.py``)
lives in the cache, ``kv_dir()``, under the same id, and goes when its session goes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localllm.errors import InvalidArgument, LocalLLMError
from localllm.fileio import write_json_atomic
from localllm.generation import ChatMessage
from localllm.paths import cache_root, state_root
from localllm.text import escape_untrusted

__all__ = [
    "ENV_NO_HISTORY",
    "KEEP_SESSIONS",
    "SESSION_FORMAT",
    "SavedSession",
    "SessionListing",
    "history_enabled",
    "kv_dir",
    "list_sessions",
    "load_session",
    "new_session_id",
    "prune_sessions",
    "save_session",
    "sessions_dir",
]

ENV_NO_HISTORY = "LOCALLLM_NO_HISTORY"
KEEP_SESSIONS = 200
SESSION_FORMAT = "localllm-session/1"
_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,63}")


def sessions_dir() -> Path:
    return state_root() / "sessions"


def kv_dir() -> Path:
    """Where sessions' KV states are cached: $XDG_CACHE_HOME/localllm/kv."""
    return cache_root() / "kv"


def history_enabled(no_history: bool = False) -> bool:
    """Off with --no-history or LOCALLLM_NO_HISTORY=1 (any value but empty, 0, false, no)."""
    env = os.environ.get(ENV_NO_HISTORY, "").strip().lower()
    return not no_history and env in ("", "0", "false", "no")


def new_session_id() -> str:
    """A sortable, unique id: the start time and four random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def _path_for(session_id: str) -> Path:
    if not _ID.fullmatch(session_id):
        raise InvalidArgument(
            f"session id {escape_untrusted(session_id, 40)!r} is not one localllm makes; "
            "`/sessions` in a chat (or `localllm chat --resume` alone) finds them"
        )
    return sessions_dir() / f"{session_id}.json"


def save_session(session_id: str, data: dict[str, Any]) -> Path:
    """Write one session's record (atomically, 0600), then prune the oldest beyond the limit."""
    path = _path_for(session_id)
    write_json_atomic(path, {**data, "format": SESSION_FORMAT, "id": session_id}, mode=0o600)
    prune_sessions()
    return path


def _session_files() -> list[Path]:
    """Session files, newest first (by modification time: the last turn written)."""
    folder = sessions_dir()
    if not folder.is_dir():
        return []
    files = [p for p in folder.glob("*.json") if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def prune_sessions(keep: int = KEEP_SESSIONS) -> int:
    """Delete all but the newest ``keep`` sessions, and the KV states of sessions gone;
    returns how many sessions went."""
    from localllm.runtime.kv_state import prune_states  # not imported by a chat without history

    files = _session_files()
    for path in files[keep:]:
        path.unlink(missing_ok=True)
    prune_states(kv_dir(), keep_keys={p.stem for p in files[:keep]})
    return len(files[keep:])


@dataclass(frozen=True)
class SavedSession:
    """A session read back from disk: enough to reopen it with the same model and settings."""

    id: str
    path: Path
    saved_at: str
    model_ref: str | None
    model_path: str | None
    model_sha256: str | None
    settings: dict[str, Any]
    system: str | None
    messages: tuple[ChatMessage, ...]  # the transcript since the last /reset, no system prompt
    dropped_messages: int  # leading messages no longer in the model's context
    extra: dict[str, Any]


def _parse(path: Path, raw: Any) -> SavedSession:
    if not isinstance(raw, dict) or raw.get("format") != SESSION_FORMAT:
        raise ValueError("not a localllm session record")
    model = raw.get("model") or {}
    messages = []
    for item in raw.get("messages") or []:
        role, content = item.get("role"), item.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError("a message without role and content")
        messages.append(ChatMessage(role, content))
    system = messages.pop(0).content if messages and messages[0].role == "system" else None
    settings = raw.get("settings")
    if not isinstance(settings, dict):
        raise ValueError("no settings")
    return SavedSession(
        id=str(raw.get("id") or path.stem),
        path=path,
        saved_at=str(raw.get("saved_at") or ""),
        model_ref=model.get("ref"),
        model_path=model.get("path"),
        model_sha256=model.get("sha256"),
        settings=settings,
        system=system,
        messages=tuple(messages),
        dropped_messages=int(raw.get("dropped_messages") or 0),
        extra={k: v for k, v in raw.items() if k in ("template",)},
    )


def _read(path: Path) -> SavedSession:
    try:
        return _parse(path, json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        reason = escape_untrusted(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise LocalLLMError(
            f"session file {path} cannot be read ({reason}); it was left in place: "
            "resume another one (`localllm chat --resume ID`) or start a new chat"
        ) from None


def load_session(session_id: str | None = None) -> SavedSession:
    """The named session, or the latest one when ``session_id`` is None."""
    if session_id is None:
        files = _session_files()
        if not files:
            raise LocalLLMError(
                f"no saved chat session in {sessions_dir()}; start one with `localllm chat`"
            )
        return _read(files[0])
    path = _path_for(session_id)
    if not path.is_file():
        recent = ", ".join(p.stem for p in _session_files()[:3]) or "none yet"
        raise InvalidArgument(f"no chat session {session_id!r}; the latest: {recent}")
    return _read(path)


@dataclass(frozen=True)
class SessionListing:
    """One line of /sessions."""

    id: str
    saved_at: str
    model: str
    messages: int
    first_message: str
    problem: str | None = None
    state_bytes: int = 0  # its saved KV state on disk (0: none)


def list_sessions(limit: int = 20) -> list[SessionListing]:
    """The newest sessions, for /sessions (unreadable ones flagged, not hidden)."""
    from localllm.runtime.kv_state import state_files

    rows = []
    for path in _session_files()[:limit]:
        try:
            saved = _read(path)
        except LocalLLMError as exc:
            rows.append(SessionListing(path.stem, "", "?", 0, "", problem=str(exc)))
            continue
        state = state_files(kv_dir(), path.stem)
        first = next((m.content for m in saved.messages if m.role == "user"), "")
        rows.append(
            SessionListing(
                saved.id,
                saved.saved_at,
                saved.model_ref or saved.model_path or "?",
                len(saved.messages),
                first,
                state_bytes=state.bytes,
            )
        )
    return rows
