"""A model split across this machine, its GPUs and llama.cpp RPC servers: what each holds.

Nothing is loaded or sent to the servers. llama.cpp's own dry run, with the servers'
devices attached, chooses every layer's device as a real load would (``-ngl`` and
``--tensor-split`` as llama.cpp reads them), gives each cache to the byte and says which
device keeps each layer's cache, and logs each device's compute buffer. The weights per
device come from the GGUF's tensor table: a layer's tensors go where its layer goes, the
token embeddings stay on this machine (llama.cpp's input layer is always the CPU), the
output tensors go with the output layer, and a model without its own output matrix gets
a copy of the token embeddings there (llama.cpp's ``TENSOR_DUPLICATED``).

Each host's memory is what it reports: this machine's available memory, each local GPU's
free memory, each server's device memory (a CPU server reports its total RAM as free:
ggml-cpu cannot tell). A GPU on unified memory (Metal, an iGPU) holds its share in this
machine's RAM: the share is checked against the GPU's free memory (Metal's working set)
and, once, with this machine's own share against the available RAM.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from localllm.errors import InsufficientMemory, InvalidArgument
from localllm.machine import available_memory_bytes
from localllm.paths import cache_root
from localllm.plan.kvcalc import fit_verdict
from localllm.plan.tensor_table import TensorEntry
from localllm.runtime.devices import GgmlDevice
from localllm.runtime.dry_run import CacheReport, DryRunSettings
from localllm.runtime.params import LoadOptions
from localllm.runtime.rpc_plan import DeviceShare, SplitContext, SplitDryRun

__all__ = [
    "THIS_MACHINE",
    "HostShare",
    "SplitPlan",
    "SplitRequest",
    "SplitResult",
    "check_split_load",
    "host_shares",
    "layer_of_tensor",
    "plan_split",
]

THIS_MACHINE = "this machine"
_CELL_STEP = 256  # --budget answers in multiples of 256 tokens per sequence, as kv-calc
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.")
# Tensors of llama.cpp's input layer (always on the CPU): embeddings and their norms.
_INPUT_TENSOR = re.compile(r"^(token_embd|token_types|position_embd|per_layer_token_embd)")
_DEFAULT_CTX = 4096


@dataclass(frozen=True)
class SplitRequest:
    """What the command would load: the model, the servers, llama.cpp's split flags."""

    model: str | None
    endpoints: tuple[str, ...]
    ctx: tuple[int, ...] = ()  # tokens per sequence; empty: min(trained, 4096)
    n_seq: int = 1
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "on"
    ubatch: int = 512
    swa_full: bool = False
    n_gpu_layers: int = -1
    tensor_split: tuple[float, ...] = ()
    budget_bytes: int | None = None  # per host: the largest context every host holds
    repack: bool = True


@dataclass(frozen=True)
class HostShare:
    """One host's part of the model at one context size."""

    host: str  # THIS_MACHINE, a local GPU's ggml name (CUDA0, MTL0) or a server's host:port
    devices: tuple[str, ...]  # ggml's names: CPU, RPC0, CUDA0...
    layers: tuple[int, ...]  # the output layer is number n_layer
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int  # llama.cpp's log, to 0.01 MiB
    output_bytes: int
    memory_bytes: int | None  # available here; a GPU's free memory; a server's reported
    unified: bool = False  # a GPU whose memory is this machine's RAM (Metal, an iGPU)
    shared_bytes: int = 0  # this machine: the unified GPUs' shares, also in its RAM

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.output_bytes

    @property
    def checked_bytes(self) -> int:
        """What is checked against ``memory_bytes``: this machine's RAM holds its own share
        and the unified GPUs' (each byte counted once)."""
        return self.total_bytes + self.shared_bytes

    @property
    def verdict(self) -> str:
        return fit_verdict(self.checked_bytes, self.memory_bytes)

    def as_json(self) -> dict[str, object]:
        return {
            "host": self.host,
            "devices": list(self.devices),
            "layers": list(self.layers),
            "weights_bytes": self.weights_bytes,
            "kv_bytes": self.kv_bytes,
            "compute_bytes": self.compute_bytes,
            "output_bytes": self.output_bytes,
            "total_bytes": self.total_bytes,
            "unified_memory": self.unified,
            "shared_bytes": self.shared_bytes,
            "memory_bytes": self.memory_bytes,
            "verdict": self.verdict,
        }


@dataclass(frozen=True)
class SplitPlan:
    """Every host's share at one context size."""

    ctx: int  # tokens per sequence
    n_seq: int
    hosts: tuple[HostShare, ...]
    kv_bytes: int  # all caches, llama.cpp's dry run to the byte
    error: str | None = None  # llama.cpp refused the context

    @property
    def fits(self) -> bool:
        return self.error is None and all(h.verdict != "too big" for h in self.hosts)

    def as_json(self) -> dict[str, object]:
        data: dict[str, object] = {"ctx": self.ctx, "n_seq": self.n_seq}
        if self.error:
            data["error"] = self.error
        data["kv_bytes"] = self.kv_bytes
        data["hosts"] = [h.as_json() for h in self.hosts]
        data["fits"] = self.fits
        return data


@dataclass(frozen=True)
class SplitResult:
    """The split of one model at each asked context, and the --budget answer."""

    label: str
    request: SplitRequest
    n_layer: int
    weights_bytes: int
    plans: tuple[SplitPlan, ...]
    budget: SplitPlan | None = None  # the largest context that fits every host
    budget_capped: bool = False  # the budget answer stopped at the trained context
    notes: tuple[str, ...] = ()
    gpus: tuple[str, ...] = ()  # this machine's GPU devices that took layers' shares

    def as_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "model": self.label,
            "rpc": list(self.request.endpoints),
            "gpus": list(self.gpus),
            "n_gpu_layers": self.request.n_gpu_layers,
            "tensor_split": list(self.request.tensor_split),
            "n_layer": self.n_layer,
            "weights_bytes": self.weights_bytes,
            "source": "llama.cpp dry run",
            "plans": [p.as_json() for p in self.plans],
        }
        if self.request.budget_bytes is not None:
            data["budget_bytes"] = self.request.budget_bytes
            data["budget"] = self.budget.as_json() if self.budget else None
            data["budget_capped"] = self.budget_capped
        return data


def layer_of_tensor(name: str, n_layer: int) -> int | None:
    """The layer a tensor belongs to: its block, ``n_layer`` (output), None (input)."""
    if m := _LAYER_TENSOR.match(name):
        return int(m[1])
    if _INPUT_TENSOR.match(name):
        return None
    return n_layer


def _weights_by_layer(tensors: Sequence[TensorEntry], n_layer: int) -> dict[int | None, int]:
    by_layer: dict[int | None, int] = defaultdict(int)
    for t in tensors:
        by_layer[layer_of_tensor(t.name, n_layer)] += t.n_bytes
    if not any(t.name == "output.weight" for t in tensors):
        # Tied embeddings: llama.cpp loads a second copy of token_embd for the output.
        tied = sum(t.n_bytes for t in tensors if t.name == "token_embd.weight")
        by_layer[n_layer] += tied
    return by_layer


def _kv_by_device(
    caches: Sequence[CacheReport], cache_devices: Sequence[dict[int, str]]
) -> Counter[str]:
    """Each cache's bytes shared out over the devices that keep its layers.

    Layers of one cache are alike (llama.cpp sizes each cache's rows per layer the same
    within an architecture's cache), so a device's share is its count of the layers.
    DeepSeek-V4's compressor states log no devices: they are counted here.
    """
    by_device: Counter[str] = Counter()
    logged = iter(cache_devices)
    for cache in caches:
        devices = next(logged, {}) if cache.kind != "state" else {}
        total = cache.bytes
        if not devices:
            by_device["CPU"] += total
            continue
        counts = Counter(devices.values())
        layers = sum(counts.values())
        for device, count in counts.items():
            by_device[device] += total * count // layers
    return by_device


def host_shares(
    split: SplitContext,
    weights_by_layer: dict[int | None, int],
    memory: dict[str, int | None],
    gpus: Sequence[GgmlDevice] = (),
) -> tuple[HostShare, ...]:
    """Group llama.cpp's devices by host: this machine's CPU first, then each server and
    each local GPU (its own memory) in llama.cpp's device order."""
    kv = _kv_by_device(split.plan.caches, split.cache_devices)
    local = {d.name: d for d in gpus}
    groups: dict[str, list[DeviceShare]] = {THIS_MACHINE: []}
    for share in split.shares:
        key = share.endpoint or (share.device if share.device in local else THIS_MACHINE)
        groups.setdefault(key, []).append(share)
    hosts = []
    for host, shares in groups.items():
        layers = tuple(sorted(i for s in shares for i in s.layers))
        weights = sum(weights_by_layer.get(i, 0) for i in layers)
        here = host == THIS_MACHINE
        if here:
            weights += weights_by_layer.get(None, 0)  # the input layer
        hosts.append(
            HostShare(
                host=host,
                devices=tuple(s.device for s in shares) or ("CPU",),
                layers=layers,
                weights_bytes=weights,
                kv_bytes=sum(kv[s.device] for s in shares),
                compute_bytes=sum(s.compute_bytes for s in shares),
                output_bytes=(split.plan.output_bytes or 0) if here else 0,
                memory_bytes=memory.get(host),
                unified=host in local and local[host].unified,
            )
        )
    shared = sum(h.total_bytes for h in hosts if h.unified)
    return (replace(hosts[0], shared_bytes=shared), *hosts[1:])


def _settings(request: SplitRequest, ctx: int) -> DryRunSettings:
    return DryRunSettings(
        ctx,
        n_seq=request.n_seq,
        n_batch=request.ubatch,
        n_ubatch=request.ubatch,
        type_k=request.type_k,
        type_v=request.type_v,
        flash_attn=request.flash_attn,
        swa_full=request.swa_full,
    )


class _Planner:
    """One dry-run model with the servers attached; plans by context size."""

    def __init__(
        self,
        dry: SplitDryRun,
        request: SplitRequest,
        by_layer: dict[int | None, int],
        memory: dict[str, int | None],
        gpus: Sequence[GgmlDevice],
    ) -> None:
        self.dry, self.request, self.by_layer, self.memory = dry, request, by_layer, memory
        self.gpus = gpus
        self.cache: dict[int, SplitPlan] = {}

    def plan(self, ctx: int) -> SplitPlan:
        if ctx not in self.cache:
            split = self.dry.plan(_settings(self.request, ctx))
            if split.plan.error:
                self.cache[ctx] = SplitPlan(ctx, self.request.n_seq, (), 0, split.plan.error)
            else:
                hosts = host_shares(split, self.by_layer, self.memory, self.gpus)
                self.cache[ctx] = SplitPlan(ctx, self.request.n_seq, hosts, split.plan.kv_bytes)
        return self.cache[ctx]

    def fits_budget(self, ctx: int, budget: int) -> bool:
        plan = self.plan(ctx)
        return plan.error is None and all(
            h.checked_bytes <= min(budget, h.memory_bytes or budget) for h in plan.hosts
        )

    def largest(self, budget: int, ceiling: int) -> tuple[SplitPlan | None, bool]:
        """The largest multiple of 256 tokens (or the ceiling) every host holds."""
        if self.fits_budget(ceiling, budget):
            return self.plan(ceiling), True
        if not self.fits_budget(_CELL_STEP, budget):
            return None, False
        lo, hi = 1, -(-ceiling // _CELL_STEP)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.fits_budget(mid * _CELL_STEP, budget) else (lo, mid)
        return self.plan(lo * _CELL_STEP), False


def _memory_by_host(endpoints: Sequence[str]) -> dict[str, int | None]:
    from localllm.rpc.hosts import hosts_memory, parse_endpoints

    memory: dict[str, int | None] = {THIS_MACHINE: available_memory_bytes()}
    if not endpoints:
        return memory
    for host in hosts_memory(parse_endpoints(list(endpoints))):
        memory[str(host.endpoint)] = host.total_bytes
    return memory


def plan_split(request: SplitRequest) -> SplitResult:
    """Each host's layers, weights, KV, compute and verdict, from llama.cpp's dry run."""
    from localllm.gguf.header import parse_header_prefix
    from localllm.plan.tensor_table import tensor_table_of
    from localllm.runtime.devices import local_gpus
    from localllm.runtime.rpc_devices import add_rpc_servers
    from localllm.store.preview import header_file

    gpus = local_gpus() if request.n_gpu_layers != 0 else ()
    if not request.endpoints and not gpus:
        raise InvalidArgument(
            "a split plan needs --rpc HOST:PORT[,HOST:PORT...] or a GPU that llama.cpp "
            "sees (`localllm system` lists them)"
        )
    memory = _memory_by_host(request.endpoints)  # one line naming a dead server, first
    memory.update((d.name, d.memory_free_bytes) for d in gpus)
    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="localllm-split-", dir=cache_root()) as work:
        table, label = tensor_table_of(request.model, None, Path(work))
        kv = parse_header_prefix(table.header, label).kv
        arch = kv.get("general.architecture", "")
        n_layer = int(kv.get(f"{arch}.block_count", 0))
        trained = int(kv.get(f"{arch}.context_length", 0)) or _DEFAULT_CTX
        by_layer = _weights_by_layer(table.tensors, n_layer)
        devices = add_rpc_servers(request.endpoints) if request.endpoints else ()
        with (
            header_file(table.header, table.file_bytes) as path,
            SplitDryRun(
                path,
                devices,
                local_gpus=gpus,
                n_gpu_layers=request.n_gpu_layers,
                tensor_split=request.tensor_split or None,
                use_extra_bufts=request.repack,
            ) as dry,
        ):
            planner = _Planner(dry, request, by_layer, memory, gpus)
            ctxs = request.ctx or (min(trained, _DEFAULT_CTX),)
            plans = tuple(planner.plan(ctx) for ctx in ctxs)
            budget, capped = None, False
            if request.budget_bytes is not None:
                budget, capped = planner.largest(request.budget_bytes, trained)
    notes = []
    if request.endpoints:
        notes.append("a CPU RPC server reports its total RAM as its free memory (ggml cannot tell)")
    for gpu in gpus:
        if gpu.unified:
            notes.append(
                f"{gpu.name} works in this machine's RAM (unified memory): its share is "
                f"checked against {gpu.name}'s free memory and, with this machine's own "
                "share, once against the available RAM"
            )
    return SplitResult(
        label, request, n_layer, table.weights_bytes, plans, budget, capped, tuple(notes),
        tuple(d.name for d in gpus),
    )  # fmt: skip


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f}"


def check_split_load(label: str, path: str | Path, options: LoadOptions) -> SplitPlan:
    """Before a load with --rpc: every host's share must fit it (one line naming who not)."""
    from localllm.runtime.library import choose_repack

    request = SplitRequest(
        model=str(path),
        endpoints=options.rpc,
        ctx=(options.n_ctx,),
        type_k=options.type_k,
        type_v=options.type_v,
        flash_attn="on" if options.flash_attn else "off",
        ubatch=options.n_ubatch,
        swa_full=options.swa_full,
        n_gpu_layers=options.n_gpu_layers,
        tensor_split=options.tensor_split,
        repack=choose_repack(options.repack).repack,
    )
    plan = plan_split(request).plans[0]
    if plan.error:
        raise InsufficientMemory(f"llama.cpp cannot plan {label} at --ctx {plan.ctx}: {plan.error}")
    for host in plan.hosts:
        if host.verdict != "too big":
            continue
        assert host.memory_bytes is not None
        shared = f" + {_gib(host.shared_bytes)} of GPUs in its RAM" if host.shared_bytes else ""
        raise InsufficientMemory(
            f"{label} at --ctx {plan.ctx}: {host.host}'s share needs {_gib(host.checked_bytes)} "
            f"GiB (weights {_gib(host.weights_bytes)} + KV {_gib(host.kv_bytes)} + compute "
            f"{_gib(host.compute_bytes + host.output_bytes)}{shared}) but it has "
            f"{_gib(host.memory_bytes)} GiB; move layers with -ngl / --tensor-split, use a "
            "smaller --ctx (`localllm kv-calc MODEL ... --budget SIZE`), or "
            "--no-memory-check"
        )
    return plan
