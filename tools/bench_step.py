"""Per-step time of a whole decode step's attention: 32 layers (32 query / 8 KV heads, D=128, bf16, block
16, random page order, every layer its own cache), run eagerly, compiled (``torch.compile`` of the layer
loop over ``torch.ops.kvlayout.attend``) and as one replayed CUDA graph, next to FlashInfer's eager step.

    python tools/bench_step.py [--batches 1,64,256] [--context 512] [--layers 32] [--json rows.json]

Each mode is timed as a serving engine runs it: the step's metadata built (``build_attention_metadata``,
or ``StepBuffers.build`` for the graph), then every layer's K/V write and attention, back to back for
``--steps`` steps (CUDA events around them; the GPU waits when the host is slower). ``host us`` is the
host time to issue one step with the GPU idle (what the step costs the CPU; ``per layer`` divides it by
the layers, the step's metadata included); ``bytes`` counts each
layer's cached K/V read once plus the new K/V, q and out, as a roofline does. The copy ceiling is
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from bench_common import device_name, measure_ceilings, timed

import kvlayout as kvl
from kvlayout.engine.graphs import capture_graph
from kvlayout.registry import available_backends
from kvlayout.step_buffers import StepBuffers

HQ, HKV, D, BLOCK = 32, 8, 128, 16


class Attn(kvl.AttentionLayer, torch.nn.Module):
    pass


def make_layers(num_layers: int, num_blocks: int, device) -> tuple[list, kvl.KVCachePlan]:
    spec = kvl.AttentionSpec(HKV, D, torch.bfloat16, BLOCK)
    specs = {f"l{i}": spec for i in range(num_layers)}
    plan = kvl.plan_kv_cache(specs, num_blocks * spec.page_size_bytes * num_layers)
    caches = kvl.allocate_kv_cache(plan, device)
    layers = []
    for name, cache in caches.items():
        cache.normal_()
        layer = Attn(layer_name=name, spec=spec, num_heads=HQ)
        layer.bind_kv_cache(cache)
        layers.append(layer)
    return layers, plan


def step_time(run_step: Callable[[], None], steps: int) -> tuple[float, float]:
    """(seconds per step back to back, host seconds to issue one step with the GPU idle)."""
    for _ in range(3):
        run_step()
    torch.cuda.synchronize()
    host = []
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_step()
        host.append(time.perf_counter() - t0)
    return timed(run_step, "cuda", iters=steps), statistics.median(host)


def bench_batch(batch: int, context: int, num_layers: int, steps: int, device, have_fi: bool) -> list[dict]:
    need = -(-(context + 1) // BLOCK)
    num_blocks = batch * need + 1
    layers, plan = make_layers(num_layers, num_blocks, device)
    perm = torch.randperm(num_blocks).tolist()
    sched = [kvl.ScheduledRequest(context, 1, perm[r * need:(r + 1) * need]) for r in range(batch)]
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, HQ, D, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, HKV, D, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    nbytes = num_layers * batch * ((context + 1) * HKV * 2 * D * 2 + 2 * HQ * D * 2 + 2 * HKV * D * 2)
    rows = []

    def eager(backend: str):
        def run():
            meta = kvl.build_attention_metadata(sched, plan, device)
            for layer in layers:
                layer.attend(q, k, v, meta, backend, validate=False)
        return run

    def compiled():
        def layer_loop(q, k, v):
            out = q
            for layer in layers:
                out = layer.attend_op(q, k, v)
            return out
        fn = torch.compile(layer_loop, fullgraph=True, dynamic=False)

        def run():
            meta = kvl.build_attention_metadata(sched, plan, device)
            with kvl.step_context(meta, "triton", validate=False):
                fn(q, k, v)
        return run

    def graphed():
        bufs = StepBuffers(plan, max_num_reqs=batch, max_num_tokens=batch, max_blocks_per_request=need,
                           device=device)
        meta = bufs.build([], num_reqs=batch, num_tokens=batch, decode_only=True)

        def body():
            for layer in layers:
                layer.attend(q, k, v, meta, "triton", validate=False)
        graph, _ = capture_graph(body)

        def run():
            bufs.build(sched, num_reqs=batch, num_tokens=batch, decode_only=True)
            graph.replay()
        return run

    modes = [("triton eager", eager("triton")), ("triton compiled", compiled()), ("triton graph", graphed())]
    if have_fi:
        modes.append(("flashinfer eager", eager("flashinfer")))
    for name, run in modes:
        per, host = step_time(run, steps)
        rows.append({"batch": batch, "context": context, "layers": num_layers, "mode": name,
                     "step_us": per * 1e6, "host_us": host * 1e6, "bytes": nbytes, "TBps": nbytes / per / 1e12})
    del layers
    torch.cuda.empty_cache()
    return rows


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_step needs a CUDA device (it times CUDA-graph replay)")
        return 2
    device = torch.device("cuda")
    ceil = measure_ceilings(device)
    have_fi = available_backends(device).get("flashinfer") is None
    rows = []
    with torch.inference_mode():                       # as an engine step runs
        for b in (int(x) for x in args.batches.split(",")):
            rows += bench_batch(b, args.context, args.layers, args.steps, device, have_fi)
    print(f"{device_name(device)}: copy ceiling {ceil['copy_TBps']:.2f} TB/s; {args.layers}-layer decode step, "
          f"context {args.context}")
    print(f"{'batch':>6} {'mode':<18}{'step us':>10}{'host us':>10}{'per layer':>10}{'TB/s':>8}{'% copy':>8}")
    for r in rows:
        print(f"{r['batch']:>6} {r['mode']:<18}{r['step_us']:>10.1f}{r['host_us']:>10.1f}"
              f"{r['host_us'] / r['layers']:>10.1f}{r['TBps']:>8.2f}"
              f"{100 * r['TBps'] / ceil['copy_TBps']:>7.0f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceilings": ceil, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
