"""What every benchmark in ``tools/`` shares: the timer, the device ceilings measured in the same run, and
the ``{"op": "ceilings", ...}`` row that ``kvlayout bench`` reads them from.

Imported as ``from bench_common import ...``: the tools folder is on ``sys.path`` both when a tool runs as a
script and when ``kvlayout bench`` loads it from its file. Importing it on a machine without CUDA sets
``TRITON_INTERPRET=1`` (unless set), so import it before anything that defines Triton kernels.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Optional, Union

import torch

if not torch.cuda.is_available():                      # must precede the first @triton.jit definition
    os.environ.setdefault("TRITON_INTERPRET", "1")

Device = Union[str, torch.device]


def host_time(fn: Callable[[], object], reps: int, warmup: int = 0) -> float:
    """Median host-clock seconds of ``reps`` single calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed(fn: Callable[[], object], device: Device, quick: bool = False, iters: Optional[int] = None) -> float:
    """Median seconds per call of ``fn`` on ``device``.

    CUDA: triton's ``do_bench`` (CUDA events, L2 flushed between calls); with ``iters``, CUDA events around
    ``iters`` back-to-back calls instead (no flush, as the layers of a step run), the median of 5 such means
    after 3 warm-up calls. CPU: the host clock around single calls, median of 1 (quick) or 3; the caller's
    first (validating, compiling) call is the warm-up.
    """
    if torch.device(device).type != "cuda":
        return host_time(fn, 1 if quick else 3)
    if iters is None:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10 if quick else 50, rep=30 if quick else 200,
                                       return_mode="median") / 1e3
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / iters)
    return statistics.median(times)


def graph_time(fn: Callable[[], object], iters: Optional[int] = None) -> float:
    """Seconds per replay of a CUDA graph of one ``fn()`` call (the kernels alone, no launch cost), timed as
    ``timed`` times an eager call."""
    from kvlayout.engine.graphs import capture_graph
    graph, _ = capture_graph(fn)
    return timed(graph.replay, "cuda", iters=iters)


def measure_ceilings(device: Device, quick: bool = False) -> dict:
    """The device's copy bandwidth (bytes read + written by one large copy) and bf16 matmul rate.

    1 GiB copy and 8192^3 matmul on CUDA; 64 MiB and 1024^3 when quick or on the CPU.
    """
    device = torch.device(device)
    big = device.type == "cuda" and not quick
    n = (1 << 30) if big else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)                                     # warm-up (the CPU timer takes none)
    t_copy = timed(lambda: dst.copy_(src), device, quick)
    src = dst = None                                   # free the copy buffers before the matmul
    m = 8192 if big else 1024
    a = torch.randn(m, m, device=device).to(torch.bfloat16)
    b = torch.randn(m, m, device=device).to(torch.bfloat16)
    a @ b
    t_mm = timed(lambda: a @ b, device, quick)
    return {"copy_TBps": 2 * n / t_copy / 1e12, "matmul_TFLOPs": 2 * m ** 3 / t_mm / 1e12,
            "copy_bytes": 2 * n, "matmul_n": m, "matmul_dtype": "bfloat16"}


def device_name(device: Device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else device.type


def versions() -> dict:
    """torch, triton and (where installed) flashinfer versions."""
    import triton
    out = {"torch": torch.__version__, "triton": triton.__version__}
    try:
        import flashinfer
        out["flashinfer"] = flashinfer.__version__
    except ImportError:
        pass
    return out


def ceilings_row(ceilings: dict, device: Device) -> dict:
    """The row ``kvlayout bench`` reads a run's ceilings from: op "ceilings", the device as impl, versions."""
    return {"op": "ceilings", "impl": device_name(device), **ceilings, **versions()}


def rate_row(seconds: float, ceilings: dict, nbytes: Optional[float] = None, flops: Optional[float] = None,
             unit: Optional[str] = None) -> dict:
    """A timed row's schema fields: the rate in ``unit`` ("TB/s" from bytes, "TFLOP/s" from FLOPs; by default
    whichever ceiling binds, bytes over copy or FLOPs over matmul) next to that ceiling."""
    if unit is None:
        unit = "TFLOP/s" if (flops or 0) / ceilings["matmul_TFLOPs"] > (nbytes or 0) / ceilings["copy_TBps"] else "TB/s"
    work, ceiling = (flops, ceilings["matmul_TFLOPs"]) if unit == "TFLOP/s" else (nbytes, ceilings["copy_TBps"])
    return {"seconds": seconds, "bytes": nbytes, "flops": flops, "achieved": work / seconds / 1e12, "unit": unit,
            "ceiling": ceiling}
