"""Every served model behind one server: loaded on demand, unloaded when idle or evicted.

Each model the server offers is a :class:`Resident`: unloaded, loading or loaded, with the
figures of its memory plan (weights + KV + compute at the server's context, llama.cpp's dry
run). What may be loaded together is decided by those plans against the memory that was
available when the server started, never by a guess; the least recently used idle model
makes room first. A request holds its model (``in_flight``) from before the load until its
last byte, so an unload never cuts a reply: eviction waits for idle models, and a request
for an evicted model loads it again.

All state changes happen on the event loop; loads and unloads run in worker threads, so
requests for other loaded models go on while one loads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from localllm.errors import LocalLLMError
from localllm.serve.config import ModelEvent, ServedModel
from localllm.serve.schema import ApiError
from localllm.text import format_bytes

__all__ = ["ModelRouter", "Resident"]

E = TypeVar("E")  # the loaded thing: a BatchEngine in the server, anything in tests


class Resident(Generic[E]):
    """One served model and its state in this server."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self.engine: E | None = None
        self.pinned = False  # given by the caller: never unloaded here
        self.status = "unloaded"  # | "loading" | "loaded" | "unloading"
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.loads = 0
        self.unloads = 0
        self.load_seconds = 0.0
        self.ready: asyncio.Event | None = None  # set when a load in progress ends
        # Bytes beside the plan, counted until the model unloads (reserve): an embeddings
        # context made on its weights.
        self.extra_bytes = 0
        self.error: str | None = None  # the last load's failure, told to its waiters

    @property
    def model_id(self) -> str:
        return self.model.model_id

    def adopt(self, engine: E, *, pinned: bool, seconds: float = 0.0) -> None:
        """``engine`` was loaded outside the router (the server's first model, at start);
        a pinned one belongs to the caller and is never unloaded here."""
        self.engine, self.status, self.pinned = engine, "loaded", pinned
        self.last_used = time.monotonic()
        self.loads += 1
        self.load_seconds += seconds

    @property
    def holds_memory(self) -> bool:
        return self.status != "unloaded"


class ModelRouter(Generic[E]):
    """Which models are loaded, and the rule that decides it."""

    def __init__(
        self,
        models: tuple[ServedModel, ...],
        *,
        load: Callable[[ServedModel], E],
        unload: Callable[[E], None],
        budget_bytes: int | None,
        keep_alive: float | None,
        on_event: Callable[[ModelEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not models:
            raise ValueError("a router needs at least one model")
        self.residents: dict[str, Resident[E]] = {m.model_id: Resident(m) for m in models}
        self._names = {n: m.model_id for m in models for n in (m.model_id, *m.aliases)}
        self._load, self._unload = load, unload
        self.budget_bytes = budget_bytes
        self.keep_alive = keep_alive  # seconds idle before an unload; None: never
        self._on_event = on_event
        self._clock = clock
        self._changed: asyncio.Condition | None = None  # created on the loop that uses it

    # ------------------------------------------------------------------ names
    @property
    def first(self) -> Resident[E]:
        return next(iter(self.residents.values()))

    def lookup(self, name: str | None) -> Resident[E]:
        """The model a request names (its id or an alias); the first when none is named."""
        if name is None:
            return self.first
        model_id = self._names.get(name)
        if model_id is None:
            served = ", ".join(repr(r) for r in self.residents)
            raise ApiError(
                404,
                f"model {name!r} is not served here; this server holds {served} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        return self.residents[model_id]

    # ------------------------------------------------------------------ memory
    def used_bytes(self, exclude: Resident[E] | None = None) -> int:
        return sum(
            (r.model.plan_bytes or 0) + r.extra_bytes
            for r in self.residents.values()
            if r.holds_memory and r is not exclude
        )

    def _check_fits_alone(self, r: Resident[E]) -> None:
        need, budget = r.model.plan_bytes, self.budget_bytes
        if need is None or budget is None or need <= budget:
            return
        raise ApiError(
            507,
            f"model {r.model_id!r} needs {format_bytes(need)} ({r.model.plan_summary}) but "
            f"{format_bytes(budget)} is available to this server; serve it with a smaller "
            "--ctx or --parallel, a quantized --kv-type, or a smaller quant",
            param="model",
            code="insufficient_memory",
        )

    def _victims(self, r: Resident[E], more: int | None = None) -> list[Resident[E]] | None:
        """Idle loaded models to unload, least recently used first, so that ``r`` fits
        (``more``: so that ``more`` bytes fit beside everything held, ``r`` included);
        None while the models holding memory are busy (then the caller waits)."""
        if self.budget_bytes is None:
            return []
        if more is not None:
            need, free = more, self.budget_bytes - self.used_bytes()
        elif r.model.plan_bytes is None:
            return []
        else:
            need, free = r.model.plan_bytes, self.budget_bytes - self.used_bytes(exclude=r)
        if need <= free:
            return []
        idle = sorted(
            (
                x
                for x in self.residents.values()
                if x is not r and x.status == "loaded" and x.in_flight == 0 and not x.pinned
            ),
            key=lambda x: x.last_used,
        )
        chosen = []
        for x in idle:
            chosen.append(x)
            free += (x.model.plan_bytes or 0) + x.extra_bytes
            if need <= free:
                return chosen
        return None

    async def _room(self, r: Resident[E], more: int | None, wants: str) -> list[Resident[E]] | None:
        """The idle models to unload so that ``r`` fits (``more``: ``more`` bytes for it,
        loaded); None once a busy model has changed state (the caller looks again); 507
        naming what ``wants`` the memory when nothing holding it can let go."""
        victims = self._victims(r, more)
        if victims is not None:
            return victims
        if not self._may_free(r):
            holders = ([r] if more is not None else []) + self._holders(r)
            raise ApiError(
                507,
                f"{wants} but {format_bytes(self.used_bytes(exclude=r if more is None else None))}"
                f" of this server's {format_bytes(self.budget_bytes or 0)} is held by "
                f"{', '.join(repr(x.model_id) for x in holders)}, which cannot be unloaded here",
                param="model",
                code="insufficient_memory",
            )
        cond = self._condition()
        async with cond:  # wait for a busy model to go idle, then look again
            await cond.wait()
        return None

    def _holders(self, r: Resident[E]) -> list[Resident[E]]:
        return [x for x in self.residents.values() if x is not r and x.holds_memory]

    def _may_free(self, r: Resident[E]) -> bool:
        """Whether waiting can free memory for ``r``: some holder is busy or in transition
        (a pinned, idle model never lets go)."""
        return any(
            x.in_flight > 0 or x.status in ("loading", "unloading") for x in self._holders(r)
        )

    # ------------------------------------------------------------------ requests
    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def acquire(self, name: str | None) -> Resident[E]:
        """The loaded model ``name`` names, held for one request until :meth:`release`."""
        r = self.lookup(name)
        self._check_fits_alone(r)
        r.in_flight += 1
        try:
            await self._ensure_loaded(r, "request")
        except BaseException:
            await self._let_go(r)
            raise
        r.last_used = self._clock()
        return r

    async def release(self, r: Resident[E]) -> None:
        """The request is over: its model may be unloaded or evicted once idle."""
        r.last_used = self._clock()
        await self._let_go(r)
        if self.keep_alive == 0 and r.in_flight == 0:
            await self.unload(r, "keep-alive")

    async def _let_go(self, r: Resident[E]) -> None:
        r.in_flight -= 1
        cond = self._condition()
        async with cond:
            cond.notify_all()

    async def _ensure_loaded(self, r: Resident[E], reason: str) -> None:
        cond = self._condition()
        while True:
            if r.status == "loaded":
                return
            if r.status == "unloading":  # let it finish: its memory is still held
                async with cond:
                    await cond.wait()
                continue
            if r.status == "loading":
                assert r.ready is not None
                await r.ready.wait()
                if r.status != "loaded":
                    raise ApiError(500, f"model {r.model_id!r} failed to load: {r.error}",
                                   kind="server_error", code="model_load_failed")  # fmt: skip
                continue
            wants = f"model {r.model_id!r} needs {format_bytes(r.model.plan_bytes or 0)}"
            victims = await self._room(r, None, wants)
            if victims is None:
                continue
            r.status, r.ready, r.error = "loading", asyncio.Event(), None
            try:
                for victim in victims:
                    await self.unload(victim, f"evicted for {r.model_id}")
                await self._do_load(r, reason)
            finally:
                if r.status == "loading":  # an unexpected error: the load did not happen
                    r.status, r.error = "unloaded", r.error or "the load was interrupted"
                r.ready.set()
                async with cond:
                    cond.notify_all()

    async def reserve(self, r: Resident[E], nbytes: int, what: str) -> None:
        """Count ``nbytes`` for ``r`` beside its plan until it unloads: ``what`` it makes on
        its weights (an embeddings context). ``r`` is loaded and held by the caller's
        request. Idle models are unloaded to make room and busy ones waited for; 507 when
        nothing can free enough."""
        while r.extra_bytes < nbytes:
            budget, plan = self.budget_bytes, r.model.plan_bytes or 0
            if budget is not None and plan + nbytes > budget:
                raise ApiError(
                    507,
                    f"model {r.model_id!r}'s {what} needs {format_bytes(nbytes)} beside its "
                    f"{format_bytes(plan)}, more than the {format_bytes(budget)} available to "
                    "this server; serve it with a smaller --ctx",
                    param="model",
                    code="insufficient_memory",
                )
            wants = f"model {r.model_id!r}'s {what} needs {format_bytes(nbytes)}"
            victims = await self._room(r, nbytes - r.extra_bytes, wants)
            if victims is None:
                continue
            r.extra_bytes = nbytes  # counted first: a load meanwhile sees the room taken
            for victim in victims:
                await self.unload(victim, f"evicted for {r.model_id}'s {what}")

    async def _do_load(self, r: Resident[E], reason: str) -> None:
        started = time.perf_counter()
        try:
            engine = await asyncio.to_thread(self._load, r.model)
        except LocalLLMError as exc:
            r.status, r.error = "unloaded", str(exc)
            self._emit(ModelEvent(r.model_id, "load_failed", time.perf_counter() - started, reason))
            raise ApiError(
                500, f"model {r.model_id!r} failed to load: {exc}", kind="server_error",
                code="model_load_failed",
            ) from None  # fmt: skip
        seconds = time.perf_counter() - started
        r.engine, r.status = engine, "loaded"
        r.loads += 1
        r.load_seconds += seconds
        r.last_used = self._clock()
        self._emit(ModelEvent(r.model_id, "loaded", seconds, reason))

    async def load(self, name: str, reason: str = "request") -> Resident[E]:
        """Load ``name`` now (``POST /models/load``), evicting idle models if needed."""
        r = self.lookup(name)
        self._check_fits_alone(r)
        r.in_flight += 1  # held while loading, so a concurrent eviction cannot pick it
        try:
            await self._ensure_loaded(r, reason)
            r.last_used = self._clock()
        finally:
            await self._let_go(r)
        return r

    async def unload(self, r: Resident[E], reason: str) -> bool:
        """Unload ``r`` if it is loaded and idle; False when it is not loaded or busy."""
        if r.status != "loaded" or r.in_flight > 0 or r.pinned or r.engine is None:
            return False
        engine, r.engine = r.engine, None
        r.status = "unloading"
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self._unload, engine)
        finally:
            r.status, r.extra_bytes = "unloaded", 0
            r.unloads += 1
        self._emit(ModelEvent(r.model_id, "unloaded", time.perf_counter() - started, reason))
        cond = self._condition()
        async with cond:
            cond.notify_all()
        return True

    async def reap(self) -> list[str]:
        """Unload every model idle for longer than the keep-alive; their ids."""
        if self.keep_alive is None:
            return []
        now = self._clock()
        expired = [
            r
            for r in self.residents.values()
            if r.status == "loaded" and r.in_flight == 0 and now - r.last_used >= self.keep_alive
        ]
        return [r.model_id for r in expired if await self.unload(r, "keep-alive")]

    async def run_reaper(self, period: float = 1.0) -> None:
        """Reap forever (a task the server starts and cancels)."""
        while True:
            await asyncio.sleep(period)
            await self.reap()

    def expires_in(self, r: Resident[E]) -> float | None:
        """Seconds until ``r`` unloads when nothing uses it; None: never (or not loaded)."""
        if r.status != "loaded" or self.keep_alive is None or r.pinned:
            return None
        if r.in_flight:
            return self.keep_alive
        return max(0.0, self.keep_alive - (self._clock() - r.last_used))

    def close_all(self) -> None:
        """Unload every loaded model the router owns (the server is stopping)."""
        for r in self.residents.values():
            if r.engine is not None and not r.pinned:
                engine, r.engine, r.status = r.engine, None, "unloaded"
                self._unload(engine)

    def _emit(self, event: ModelEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)
