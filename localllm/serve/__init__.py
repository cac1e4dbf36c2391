"""``localllm serve``: an OpenAI-compatible API and a chat page over one loaded model.

- :mod:`~localllm.serve.config`: ServeOptions (checked before the load) and the events
  the server reports (ServerReady, RequestLogged);
- :mod:`~localllm.serve.schema`: request bodies checked field by field (ApiError);
- :mod:`~localllm.serve.app`: the Starlette routes over the batch engine;
- :mod:`~localllm.serve.guard`: Host/Origin checks, Bearer auth, body cap and timeout;
- :mod:`~localllm.serve.wire`: the response JSON; :mod:`~localllm.serve.metrics`: /metrics;
- :mod:`~localllm.serve.server`: uvicorn, blocking (run_server) or on a thread (start_server).

Importing this package imports Starlette and uvicorn but not llama_cpp.
"""

from __future__ import annotations

from localllm.serve.app import build_app
from localllm.serve.config import RequestLogged, ServeEvent, ServeOptions, ServerReady
from localllm.serve.server import (
    RunningServer,
    ServeError,
    load_engine,
    prompt_format,
    run_server,
    start_server,
)

__all__ = [
    "RequestLogged",
    "RunningServer",
    "ServeError",
    "ServeEvent",
    "ServeOptions",
    "ServerReady",
    "build_app",
    "load_engine",
    "prompt_format",
    "run_server",
    "start_server",
]
