"""Running servers, for ``localllm ps`` and ``localllm stop``.

Each ``localllm serve`` writes one small file under ``$XDG_STATE_HOME/localllm/servers/``
(its pid and URL) once it listens and removes it when it stops. ``ps`` asks each live
server for ``/v1/models`` (the server's own, current figures: status, context, slots, the
plan's memory, seconds until its keep-alive unloads it); ``stop`` posts
``/models/unload``. A file whose process is gone (killed) is dropped on the next read.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localllm.errors import InvalidArgument, LocalLLMError
from localllm.fileio import write_json_atomic
from localllm.paths import state_root

__all__ = [
    "RunningModel",
    "ServerRecord",
    "StopResult",
    "loaded_models",
    "register_server",
    "running_servers",
    "stop_model",
    "unregister_server",
]

TIMEOUT = 5.0  # seconds for one server to answer ps or stop


@dataclass(frozen=True)
class ServerRecord:
    """One running server: where it listens and whether it wants a key."""

    pid: int
    url: str
    api_key_required: bool
    path: Path


@dataclass(frozen=True)
class RunningModel:
    """One model a running server holds (``ps``'s row)."""

    model_id: str
    server: str  # the server's URL
    status: str  # loaded | loading | unloaded
    n_ctx: int | None
    n_parallel: int | None
    memory_bytes: int | None  # weights + KV + compute from the plan
    expires_in: float | None  # seconds until the keep-alive unloads it; None: never
    problem: str | None = None  # the server did not answer (wrong key, gone)


@dataclass(frozen=True)
class StopResult:
    server: str
    model_id: str
    unloaded: bool
    message: str


def _servers_dir() -> Path:
    return state_root() / "servers"


def register_server(url: str, api_key_required: bool) -> Path:
    """Record this process as a server listening on ``url``; the file's path."""
    path = _servers_dir() / f"{os.getpid()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"pid": os.getpid(), "url": url, "api_key_required": api_key_required})
    return path


def unregister_server(path: Path) -> None:
    path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def running_servers() -> list[ServerRecord]:
    """Every registered server whose process is alive (stale files are removed)."""
    found = []
    for path in sorted(_servers_dir().glob("*.json")):
        try:
            data = json.loads(path.read_text())
            record = ServerRecord(
                int(data["pid"]), str(data["url"]), bool(data["api_key_required"]), path
            )
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # unreadable: not ours to keep
            continue
        if _alive(record.pid):
            found.append(record)
        else:
            path.unlink(missing_ok=True)
    return found


def _request(
    server: ServerRecord, route: str, api_key: str | None, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.url + route, data=data)
    request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise LocalLLMError(f"{server.url} did not answer: {exc}") from None


def _message(status: int, body: dict[str, Any]) -> str:
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return f"HTTP {status}"


def loaded_models(api_key: str | None = None) -> list[RunningModel]:
    """The models every running server holds, as each server reports them."""
    rows: list[RunningModel] = []
    for server in running_servers():
        try:
            status, body = _request(server, "/v1/models", api_key)
        except LocalLLMError as exc:
            rows.append(RunningModel("?", server.url, "?", None, None, None, None, str(exc)))
            continue
        if status != 200:
            hint = "; pass --api-key" if status == 401 else ""
            problem = _message(status, body) + hint
            rows.append(RunningModel("?", server.url, "?", None, None, None, None, problem))
            continue
        for card in body.get("data", []):
            meta, state = card.get("meta", {}), card.get("status", {})
            rows.append(
                RunningModel(
                    model_id=str(card.get("id")),
                    server=server.url,
                    status=str(state.get("value", "loaded")),
                    n_ctx=meta.get("n_ctx"),
                    n_parallel=meta.get("n_parallel"),
                    memory_bytes=meta.get("memory_bytes"),
                    expires_in=state.get("expires_in"),
                )
            )
    return rows


def stop_model(name: str, api_key: str | None = None) -> list[StopResult]:
    """Unload ``name`` from every running server that holds it loaded."""
    servers = running_servers()
    if not servers:
        raise InvalidArgument("no localllm server is running here (start one: localllm serve)")
    results = []
    for server in servers:
        status, body = _request(server, "/models/unload", api_key, {"model": name})
        if status == 404:
            continue  # not served there
        ok = status == 200 and bool(body.get("success"))
        message = "unloaded" if ok else _message(status, body)
        results.append(StopResult(server.url, str(body.get("model", name)), ok, message))
    if not results:
        raise InvalidArgument(
            f"no running server serves {name!r}; `localllm ps` lists what they hold"
        )
    return results
