#!/usr/bin/env python3
"""`localllm bench` with weights put in CPU_REPACK by tensor buffer overrides, repacking off.

On AMX CPUs llama.cpp's extra buffer types are AMX first, then CPU_REPACK; the AMX kernels
crash at the pinned commit (llama.cpp#20824), so localllm loads AMX machines with
``use_extra_bufts`` off and nothing is repacked. Tensor buffer overrides could give those
machines CPU_REPACK alone: this script loads with extra buffer types off and overrides
every weight CPU_REPACK can hold to it, then runs `localllm bench` unchanged. Native
llama-bench cannot do this (its ``-ot`` lists only each device's default buffer type).

Which weights: 2-D matmul weights (blk.N.attn_*/ffn_* and output) whose type ggml's x86
repacker takes, with ne[1] a multiple of 8 (ggml-cpu/repack.cpp,
ggml_repack_get_optimal_repack_type: Q4_0, Q4_K, IQ4_NL, MXFP4 with AVX2; Q2_K with
AVX512). An override bypasses llama.cpp's own support check, and a tensor CPU_REPACK
cannot hold crashes the load, so the list must be exact; the load log's CPU_REPACK buffer
then equals what ``--repack 1`` gives on a CPU without AMX (this script prints both).

    .venv/bin/python benchmarks/repack_override.py /tmp/syn7b.gguf -- -p 512 -n 128 -r 2 -t 2
    .venv/bin/python benchmarks/repack_override.py /tmp/syn7b.gguf --mode repack1 -- -p 512 ...

``--mode``: ``override`` (the above), ``repack1`` / ``repack0`` (plain ``--repack 1`` / ``0``,
for comparison); every mode prints the load log's model buffers to stderr. Everything after
``--`` goes to `localllm bench`.
"""

from __future__ import annotations

import ctypes
import re
import sys
from pathlib import Path

import gguf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MATMUL_WEIGHT = re.compile(r"^(blk\.\d+\.(attn|ffn)_[a-z_]+|output)\.weight$")


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def repackable(path: Path) -> list[str]:
    """Names of the weights ggml's x86 CPU_REPACK buffer takes on this CPU."""
    flags = cpu_flags()
    types = set()
    if "avx2" in flags:
        types |= {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}
    if "avx512f" in flags:
        types.add("Q2_K")
    names = []
    for t in gguf.GGUFReader(path).tensors:
        shape = [int(d) for d in t.shape]
        if (
            MATMUL_WEIGHT.match(t.name)
            and t.tensor_type.name in types
            and len(shape) == 2
            and shape[1] % 8 == 0
        ):
            names.append(t.name)
    return names


class TensorBuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def cpu_repack_buft() -> int:
    """ggml's CPU_REPACK buffer type, from the CPU device's extra buffer types."""
    from llama_cpp import _ggml

    lib = _ggml.libggml
    lib.ggml_backend_dev_by_type.argtypes, lib.ggml_backend_dev_by_type.restype = (
        [ctypes.c_int],
        ctypes.c_void_p,
    )
    lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_buft_name.argtypes, lib.ggml_backend_buft_name.restype = (
        [ctypes.c_void_p],
        ctypes.c_char_p,
    )
    dev = lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    reg = lib.ggml_backend_dev_backend_reg(dev)
    address = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    get_extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
    bufts = get_extra(dev)
    names = []
    i = 0
    while bufts[i]:
        name = lib.ggml_backend_buft_name(bufts[i]).decode()
        if name == "CPU_REPACK":
            return bufts[i]
        names.append(name)
        i += 1
    raise SystemExit(f"no CPU_REPACK buffer type in this build (extra: {names or 'none'})")


def main() -> int:
    argv = sys.argv[1:]
    bench_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    model = Path(own[0])
    mode = own[own.index("--mode") + 1] if "--mode" in own else "override"
    if mode not in ("override", "repack1", "repack0"):
        raise SystemExit(f"--mode {mode!r}: use override, repack1 or repack0")

    from localllm.runtime import library, llama_bench

    library.import_llama_cpp()
    overrides = None
    if mode == "override":
        names = repackable(model)
        print(f"# {len(names)} weights to CPU_REPACK by override", file=sys.stderr)
        buft = cpu_repack_buft()
        overrides = (TensorBuftOverride * (len(names) + 1))()
        patterns = [f"^{re.escape(n)}$".encode() for n in names]
        for slot, pattern in zip(overrides, patterns, strict=False):
            slot.pattern, slot.buft = pattern, buft
    original = llama_bench.load_model_file

    def load_logging_buffers(llama_cpp, path, params):  # type: ignore[no-untyped-def]
        if overrides is not None:
            params.use_extra_bufts = False
            params.tensor_buft_overrides = ctypes.addressof(overrides)
        model_ptr, log = original(llama_cpp, path, params)
        for line in log:
            if "model buffer size" in line:
                print(f"# {mode} load:", line.strip(), file=sys.stderr)
        return model_ptr, log

    llama_bench.load_model_file = load_logging_buffers
    from localllm.cli import main as localllm_main

    repack = "1" if mode == "repack1" else "0"
    sys.argv = ["localllm", "bench", str(model), *bench_args, "--repack", repack]
    return localllm_main()


if __name__ == "__main__":
    sys.exit(main())
