"""The ASGI layer in front of every route: Host/Origin checks, Bearer auth, body cap.

A server on 127.0.0.1 is still reachable from any web page the user opens: a page can
POST to it (CSRF), and a DNS name rebound to 127.0.0.1 makes the browser treat the
server as that page's own origin. So the Host header must name this server, and a
browser's Origin must be this server's own. The body is read here, bounded in size
and in time between chunks, then replayed to the route.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from localllm.serve.config import EventSink, RequestLogged
from localllm.serve.metrics import Metrics
from localllm.serve.schema import ApiError

__all__ = ["PUBLIC_PATHS", "Guard", "host_name"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Reachable without the API key: the chat page (it asks for the key) and the health check.
PUBLIC_PATHS = ("/", "/health", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)
# scope["state"] key where routes leave what RequestLogged reports about a generation
USAGE_KEY = "localllm.usage"


def host_name(value: str) -> str:
    """``'[::1]:8080'`` -> ``'::1'``, ``'Example.COM:80'`` -> ``'example.com'``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """Checks a request before the app sees it; counts and logs every answer."""

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        *,
        api_key: str | None,
        host_names: frozenset[str] | None,
        max_body_bytes: int,
        body_timeout: float,
        metrics: Metrics,
        on_event: EventSink | None = None,
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.host_names = host_names
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.metrics = metrics
        self.on_event = on_event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            self._check(scope, headers)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(headers, receive)
                if body is None:
                    status = 499  # the client left before sending its body
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_status)
        except ApiError as exc:
            extra = [(b"www-authenticate", b"Bearer")] if exc.status == 401 else []
            await _send_json(send_status, exc.status, exc.body(), extra)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _check(self, scope: Scope, headers: dict[str, str]) -> None:
        host = headers.get("host", "")
        if self.host_names is not None and host_name(host) not in self.host_names:
            raise ApiError(
                403,
                f"Host {host[:80]!r} is not this server's name; add it with --allowed-host "
                "if it is (a foreign Host header is how DNS rebinding reaches a local server)",
                kind="forbidden",
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
                raise ApiError(
                    403,
                    f"cross-origin request from {origin[:80]!r} refused: only this server's "
                    "own pages may call it from a browser",
                    kind="forbidden",
                    code="origin_not_allowed",
                )
        path = scope["path"]
        if self.api_key is None or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY' with the key "
                "this server was started with",
                kind="authentication_error",
                code="invalid_api_key",
            )

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes | None:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large(int(declared))
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                raise ApiError(
                    408,
                    f"the request body stalled for {self.body_timeout:g} s; send it at once",
                    code="request_timeout",
                ) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, size: int) -> ApiError:
        return ApiError(
            413,
            f"request body of {size} bytes is over this server's limit of "
            f"{self.max_body_bytes} bytes",
            code="request_too_large",
        )

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        self.metrics.count(scope["method"], scope["path"], status)
        if self.on_event is None:
            return
        usage = scope.get("state", {}).get(USAGE_KEY) or {}
        self.on_event(
            RequestLogged(
                method=scope["method"],
                path=scope["path"],
                status=status,
                seconds=seconds,
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens"),
                finish_reason=usage.get("finish_reason"),
            )
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands out the body read already, then waits for the disconnect."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(
    send: Send, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]]
) -> None:
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
