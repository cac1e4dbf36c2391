"""serve's model router: load on demand, keep-alive, eviction by plan, holds across loads.

The router is driven with stand-in engines (a load records itself) and a clock the test
moves, so the rules are checked exactly; tests/test_serve_models.py runs real models.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from localllm.errors import ModelLoadError
from localllm.serve.config import ModelEvent, ServedModel
from localllm.serve.router import ModelRouter
from localllm.serve.schema import ApiError

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Engines:
    """Loads and unloads, in order; ``gate`` holds a load until the test opens it."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.live: set[str] = set()
        self.fail: set[str] = set()
        self.gate: dict[str, threading.Event] = {}

    def load(self, model: ServedModel) -> str:
        if model.model_id in self.gate:
            self.gate[model.model_id].wait(10)
        if model.model_id in self.fail:
            raise ModelLoadError(f"cannot load {model.model_id}")
        self.log.append(f"load {model.model_id}")
        self.live.add(model.model_id)
        return model.model_id

    def unload(self, engine: str) -> None:
        self.log.append(f"unload {engine}")
        self.live.discard(engine)


def served(name: str, mib: int = 100) -> ServedModel:
    return ServedModel(
        model_id=name,
        path=Path(f"/models/{name}.gguf"),
        aliases=(f"{name}.gguf",),
        plan_bytes=mib * MIB,
        plan_summary=f"weights {mib} MiB",
    )


def router(
    *names: str, budget_mib: int | None = 250, keep_alive: float | None = 300.0, mib: int = 100
) -> tuple[ModelRouter[str], Engines, Clock, list[ModelEvent]]:
    engines, clock, events = Engines(), Clock(), []
    r: ModelRouter[str] = ModelRouter(
        tuple(served(n, mib) for n in names),
        load=engines.load,
        unload=engines.unload,
        budget_bytes=budget_mib * MIB if budget_mib is not None else None,
        keep_alive=keep_alive,
        on_event=events.append,
        clock=clock,
    )
    return r, engines, clock, events


async def use(r: ModelRouter[str], name: str | None) -> str:
    resident = await r.acquire(name)
    await r.release(resident)
    return resident.model_id


def test_a_model_loads_on_its_first_request_and_stays_loaded() -> None:
    r, engines, _, events = router("a", "b")

    async def main() -> None:
        assert await use(r, "a") == "a"
        assert await use(r, "a.gguf") == "a"  # an alias names the same model
        assert await use(r, None) == "a"  # no model: the first

    asyncio.run(main())
    assert engines.log == ["load a"]
    assert r.residents["a"].status == "loaded" and r.residents["b"].status == "unloaded"
    assert [(e.model_id, e.action, e.reason) for e in events] == [("a", "loaded", "request")]


def test_an_unknown_model_is_a_404_naming_the_served_ones() -> None:
    r, *_ = router("a", "b")
    with pytest.raises(ApiError) as caught:
        asyncio.run(use(r, "c"))
    assert caught.value.status == 404
    assert "'c'" in caught.value.message and "'a', 'b'" in caught.value.message


def test_keep_alive_unloads_an_idle_model_and_a_request_brings_it_back() -> None:
    r, engines, clock, events = router("a", keep_alive=300)

    async def main() -> None:
        await use(r, "a")
        clock.now += 299
        assert await r.reap() == []
        clock.now += 1
        assert await r.reap() == ["a"]
        await use(r, "a")

    asyncio.run(main())
    assert engines.log == ["load a", "unload a", "load a"]
    assert [e.reason for e in events if e.action == "unloaded"] == ["keep-alive"]
    assert r.residents["a"].loads == 2 and r.residents["a"].unloads == 1


def test_keep_alive_zero_unloads_after_each_request_and_minus_one_never() -> None:
    r, engines, _, _ = router("a", keep_alive=0)
    asyncio.run(use(r, "a"))
    assert engines.log == ["load a", "unload a"]

    r, engines, clock, _ = router("a", keep_alive=None)

    async def main() -> None:
        await use(r, "a")
        clock.now += 10**9
        assert await r.reap() == []

    asyncio.run(main())
    assert engines.log == ["load a"] and r.expires_in(r.residents["a"]) is None


def test_a_busy_model_is_not_reaped() -> None:
    r, engines, clock, _ = router("a", keep_alive=10)

    async def main() -> None:
        held = await r.acquire("a")
        clock.now += 100
        assert await r.reap() == []
        await r.release(held)
        clock.now += 10
        assert await r.reap() == ["a"]

    asyncio.run(main())
    assert engines.log == ["load a", "unload a"]


def test_eviction_takes_the_least_recently_used_idle_model() -> None:
    r, engines, clock, events = router("a", "b", "c", budget_mib=250)  # two of 100 MiB fit

    async def main() -> None:
        await use(r, "a")
        clock.now += 1
        await use(r, "b")
        clock.now += 1
        await use(r, "a")  # a is now the more recently used
        clock.now += 1
        await use(r, "c")

    asyncio.run(main())
    assert engines.log == ["load a", "load b", "unload b", "load c"]
    assert engines.live == {"a", "c"}
    assert [e.reason for e in events if e.action == "unloaded"] == ["evicted for c"]


def test_what_is_loaded_together_never_exceeds_the_budget() -> None:
    r, engines, clock, _ = router("a", "b", "c", budget_mib=250)
    peak = 0

    async def main() -> None:
        nonlocal peak
        for name in "abcacbbca":
            await use(r, name)
            clock.now += 1
            peak = max(peak, r.used_bytes())
            assert len(engines.live) <= 2

    asyncio.run(main())
    assert peak == 200 * MIB


def test_a_request_in_flight_survives_another_models_load() -> None:
    r, engines, _, _ = router("a", "b", budget_mib=150)  # one at a time

    async def main() -> None:
        held = await r.acquire("a")
        waiting = asyncio.ensure_future(use(r, "b"))
        await asyncio.sleep(0.05)
        # b waits: a is answering, so it is neither unloaded nor cut.
        assert not waiting.done() and engines.live == {"a"}
        assert r.residents["a"].status == "loaded"
        await r.release(held)
        assert await asyncio.wait_for(waiting, 5) == "b"

    asyncio.run(main())
    assert engines.log == ["load a", "unload a", "load b"]


def test_requests_for_a_loading_model_wait_for_that_one_load() -> None:
    r, engines, _, _ = router("a")
    engines.gate["a"] = threading.Event()

    async def main() -> None:
        first = asyncio.ensure_future(use(r, "a"))
        second = asyncio.ensure_future(use(r, "a"))
        await asyncio.sleep(0.05)
        assert r.residents["a"].status == "loading" and not first.done()
        engines.gate["a"].set()
        assert await asyncio.wait_for(asyncio.gather(first, second), 5) == ["a", "a"]

    asyncio.run(main())
    assert engines.log == ["load a"]


def test_a_loaded_model_answers_while_another_loads() -> None:
    r, engines, _, _ = router("a", "b", budget_mib=250)
    engines.gate["b"] = threading.Event()

    async def main() -> None:
        await use(r, "a")
        loading = asyncio.ensure_future(use(r, "b"))
        await asyncio.sleep(0.05)
        assert r.residents["b"].status == "loading"
        assert await asyncio.wait_for(use(r, "a"), 1) == "a"  # not held up by b's load
        engines.gate["b"].set()
        await asyncio.wait_for(loading, 5)

    asyncio.run(main())


def test_a_model_too_big_alone_is_refused_with_the_plans_figures() -> None:
    r, engines, _, _ = router("big", budget_mib=50)
    with pytest.raises(ApiError) as caught:
        asyncio.run(use(r, "big"))
    assert caught.value.status == 507 and caught.value.code == "insufficient_memory"
    assert "100.00 MiB" in caught.value.message and "50.00 MiB" in caught.value.message
    assert "weights 100 MiB" in caught.value.message
    assert engines.log == [] and r.residents["big"].in_flight == 0


def test_a_failed_load_is_a_500_and_the_model_can_be_tried_again() -> None:
    r, engines, _, events = router("a")
    engines.fail.add("a")
    with pytest.raises(ApiError) as caught:
        asyncio.run(use(r, "a"))
    assert caught.value.status == 500 and "cannot load a" in caught.value.message
    assert r.residents["a"].status == "unloaded" and r.residents["a"].in_flight == 0
    assert [e.action for e in events] == ["load_failed"]
    engines.fail.clear()
    assert asyncio.run(use(r, "a")) == "a"


def test_a_pinned_model_is_never_unloaded() -> None:
    r, engines, clock, _ = router("a", "b", budget_mib=250)
    r.residents["a"].adopt("a-engine", pinned=True)

    async def main() -> None:
        clock.now += 10**6
        assert await r.reap() == []
        assert not await r.unload(r.residents["a"], "stop")

    asyncio.run(main())
    r.close_all()
    assert engines.log == []  # a belongs to its caller: not closed here


def test_memory_held_by_a_pinned_model_is_a_507_not_a_wait() -> None:
    r, engines, _, _ = router("a", "b", budget_mib=150)
    r.residents["a"].adopt("a-engine", pinned=True)
    with pytest.raises(ApiError) as caught:
        asyncio.run(asyncio.wait_for(use(r, "b"), 5))
    assert caught.value.status == 507 and "held by 'a'" in caught.value.message
    assert engines.log == []


async def embed(r: ModelRouter[str], name: str, mib: int) -> None:
    """What /v1/embeddings does with a model's first request: its context reserved."""
    resident = await r.acquire(name)
    try:
        await r.reserve(resident, mib * MIB, "embeddings context")
    finally:
        await r.release(resident)


def test_an_embeddings_context_counts_until_its_model_unloads() -> None:
    r, engines, clock, events = router("a", "b", budget_mib=400)

    async def main() -> None:
        await use(r, "a")
        clock.now += 1
        await use(r, "b")
        assert r.used_bytes() == 200 * MIB
        clock.now += 1
        await embed(r, "a", 150)  # fits beside both: nothing unloaded
        assert r.used_bytes() == 350 * MIB and engines.live == {"a", "b"}
        await embed(r, "a", 150)  # reserved once
        assert r.used_bytes() == 350 * MIB
        assert await r.unload(r.residents["a"], "stop")
        assert r.residents["a"].extra_bytes == 0 and r.used_bytes() == 100 * MIB

    asyncio.run(main())
    assert [e.action for e in events] == ["loaded", "loaded", "unloaded"]


def test_an_embeddings_context_evicts_the_least_recently_used_idle_model() -> None:
    r, engines, clock, events = router("a", "b", "c", budget_mib=350)

    async def main() -> None:
        for name in "abc":
            await use(r, name)
            clock.now += 1
        await embed(r, "c", 100)  # 300 + 100 > 350: a, the oldest, makes room
        assert engines.live == {"b", "c"} and r.used_bytes() == 300 * MIB
        clock.now += 1
        await use(r, "a")  # a again: b is now the oldest idle one
        assert engines.live == {"a", "c"} and r.used_bytes() <= 350 * MIB

    asyncio.run(main())
    assert [e.reason for e in events if e.action == "unloaded"] == [
        "evicted for c's embeddings context",
        "evicted for a",
    ]


def test_an_embeddings_context_too_big_is_a_507_with_the_figures() -> None:
    r, engines, _, _ = router("a", "b", budget_mib=250)
    r.residents["b"].adopt("b-engine", pinned=True)

    async def main() -> None:
        with pytest.raises(ApiError) as alone:
            await embed(r, "b", 200)  # 100 + 200 > 250 whatever is unloaded
        assert alone.value.status == 507 and "needs 200.00 MiB beside its 100.00 MiB" in (
            alone.value.message
        )
        await use(r, "a")
        with pytest.raises(ApiError) as held:
            await embed(r, "a", 100)  # b is pinned: nothing can make room
        assert held.value.status == 507 and "held by 'a', 'b'," in held.value.message
        assert r.residents["a"].extra_bytes == 0

    asyncio.run(asyncio.wait_for(main(), 5))
    assert engines.log == ["load a"]


def test_an_embeddings_context_waits_for_a_busy_model() -> None:
    r, engines, _, _ = router("a", "b", budget_mib=250)

    async def main() -> None:
        await use(r, "a")
        held = await r.acquire("b")  # b answers a request
        waiting = asyncio.ensure_future(embed(r, "a", 100))
        await asyncio.sleep(0.05)
        assert not waiting.done() and engines.live == {"a", "b"}
        await r.release(held)
        await asyncio.wait_for(waiting, 5)
        assert engines.live == {"a"} and r.used_bytes() == 200 * MIB

    asyncio.run(main())


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300", 300.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("0", 0.0), ("-1", None)],
)
def test_keep_alive_durations(text: str, seconds: float | None) -> None:
    from localllm.flags import parse_duration

    assert parse_duration(text, "--keep-alive") == seconds


def test_a_bad_keep_alive_is_one_line_naming_it(cli) -> None:
    result = cli("serve", "--keep-alive", "soon")
    assert result.exit_code == 2
    assert result.error_line == (
        "--keep-alive 'soon' is not a duration; use seconds (300), 30s, 5m, 1h, 0 or -1"
    )
