"""Roofline of ``kvlayout.ops.paged_prefill_with_append`` (issue 7's workload: q [512, 32, 128], k_new/v_new
[512, 8, 128], one request with a 4096-token cached prefix at page 64, bf16), next to the device's copy and
bf16 matmul ceilings measured in the same run, and FlashInfer (append + paged prefill through the registered
``flashinfer`` backend, fa3 on Hopper) on the same inputs where it is installed. Also: the page-copy
kernel's bandwidth (copy_blocks of 1024 pages) and the merge kernel on split-KV decode partials.

Bytes counted from the inputs: Q, new K/V read, old pages gathered, pages written, output, metadata
(cu_seqlens, cache_seqlens, block table). FLOPs: 4*H*D per visible query-key pair, from per-request lengths.
The ceiling that binds is the larger of bytes/copy-bandwidth and FLOPs/matmul-rate; "% of bound" is that
time over the measured time.

    python tools/bench_ops.py [--quick] [--json PATH] [--sweep]

``--quick``: tiny shapes in fp16 that run under the CPU interpreter (timings then mean nothing).
``run(quick) -> list[dict]`` is the entry point other tools build on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional

import torch
from bench_common import ceilings_row, measure_ceilings, timed  # sets TRITON_INTERPRET=1 without CUDA

import triton  # noqa: E402

import kvlayout as kvl  # noqa: E402
from kvlayout import ops  # noqa: E402
from kvlayout.backends import available_backends, get_attention_backend  # noqa: E402
from kvlayout.kernels.unified import UnifiedConfig, unified_config  # noqa: E402
from kvlayout.kernels.prefill import append_config, paged_prefill_append_launch  # noqa: E402


def prefill_inputs(quick: bool, device: torch.device, gen: torch.Generator) -> dict:
    if quick:
        h, h_kv, d, page, ctx, new, dtype = 4, 2, 32, 8, [40, 13], [16, 9], torch.float16
    else:
        h, h_kv, d, page, ctx, new, dtype = 32, 8, 128, 64, [4096], [512], torch.bfloat16
    need = [-(-(c + n) // page) for c, n in zip(ctx, new)]
    nb = sum(need) + 1
    perm = torch.randperm(nb, generator=gen).tolist()
    bt = torch.zeros(len(ctx), max(need), dtype=torch.int32)
    ids = []
    for r, k in enumerate(need):
        ids.append(perm[:k])
        bt[r, :k] = torch.tensor(perm[:k])
        perm = perm[k:]
    t = sum(new)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    return dict(q=rnd(t, h, d), k_new=rnd(t, h_kv, d), v_new=rnd(t, h_kv, d), kv_cache=rnd(nb, h_kv, page, 2 * d),
                cu_seqlens_q=torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32, device=device),
                cache_seqlens=torch.tensor(ctx, dtype=torch.int32, device=device), block_table=bt.to(device),
                _pairs=list(zip(ctx, new)), _ids=ids)


def prefill_bytes_flops(inp: dict) -> tuple[int, float]:
    q, kv = inp["q"], inp["kv_cache"]
    t, h, d = q.shape
    h_kv, page = kv.shape[1], kv.shape[2]
    el = q.element_size()
    ctx = sum(c for c, _ in inp["_pairs"])
    nbytes = (2 * t * h * d * el                           # q in, out
              + 2 * t * h_kv * d * el                      # k_new, v_new read
              + ctx * h_kv * 2 * d * el                    # old pages gathered
              + t * h_kv * 2 * d * el                      # pages written
              + 4 * (inp["cu_seqlens_q"].numel() + inp["cache_seqlens"].numel())
              + 4 * sum(-(-(c + n) // page) for c, n in inp["_pairs"]))
    visible = sum(n * c + n * (n + 1) // 2 for c, n in inp["_pairs"])
    return nbytes, 4.0 * h * d * visible


def roofline(seconds: float, nbytes: int, flops: float, ceil: dict) -> dict:
    t_mem = nbytes / (ceil["copy_TBps"] * 1e12)
    t_math = flops / (ceil["matmul_TFLOPs"] * 1e12) if flops else 0.0
    binds = "matmul" if t_math > t_mem else "copy"
    return {"seconds": seconds, "TBps": nbytes / seconds / 1e12, "TFLOPs": flops / seconds / 1e12,
            "binds": binds, "pct_of_bound": 100.0 * max(t_mem, t_math) / seconds}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_prefill(device, gen, quick: bool, ceil: dict, sweep: bool) -> list[dict]:
    inp = prefill_inputs(quick, device, gen)
    args = {k: v for k, v in inp.items() if not k.startswith("_")}
    nbytes, flops = prefill_bytes_flops(inp)
    rows = []
    ref_cache = args["kv_cache"].clone()
    want = ops.paged_prefill_with_append(**{**args, "kv_cache": ref_cache}, impl="torch")
    out = torch.empty_like(args["q"])
    ops.paged_prefill_with_append(**args, out=out)                       # validates, compiles
    err = rel_err(out, want)
    name = "paged_prefill_with_append"
    t = timed(lambda: ops.paged_prefill_with_append(**args, out=out, validate=False), device, quick)
    rows.append({"op": name, "impl": "triton", **roofline(t, nbytes, flops, ceil), "err_vs_torch": err,
                 "bytes": nbytes, "flops": flops})
    t = timed(lambda: ops.paged_prefill_with_append(**args, out=out), device, quick)
    rows.append({"op": name, "impl": "triton, validate=True", **roofline(t, nbytes, flops, ceil),
                 "note": "host checks of the index tensors (sync) included"})
    if sweep and device.type == "cuda":
        h, h_kv, d = args["q"].shape[1], args["kv_cache"].shape[1], args["q"].shape[2]
        g = triton.next_power_of_2(h // h_kv)
        chosen = append_config(args["q"].shape[0], h // h_kv, d, args["q"].element_size(), False)
        cfgs = {chosen, unified_config(args["q"].shape[0], h // h_kv, d, args["q"].element_size(), False),
                UnifiedConfig(64 // g, 64, 4, 3), UnifiedConfig(64 // g, 64, 4, 4),
                UnifiedConfig(128 // g, 64, 4, 3), UnifiedConfig(128 // g, 128, 8, 2), UnifiedConfig(64 // g, 32, 4, 4)}
        page = args["kv_cache"].shape[2]
        for cfg in sorted(cfgs, key=lambda c: (c.block_q, c.block_n, c.num_warps, c.num_stages)):
            for aligned in ((True, False) if page % cfg.block_n == 0 else (False,)):
                fn = (lambda cfg=cfg, aligned=aligned: paged_prefill_append_launch(
                    args["q"], args["k_new"], args["v_new"], args["kv_cache"], args["cu_seqlens_q"],
                    args["cache_seqlens"], args["block_table"], out, None, scale=1.0 / math.sqrt(d), causal=True,
                    soft_cap=None, config=cfg, page_aligned=aligned))
                label = f"triton {tuple(vars(cfg).values())}{' page/tile' if aligned else ''}" \
                    + (" *" if cfg == chosen and aligned == (page % cfg.block_n == 0) else "")
                try:
                    t = timed(fn, device, quick)
                except Exception as e:                                   # e.g. out of shared memory
                    rows.append({"op": name, "impl": label, "error": str(e)[:100]})
                    continue
                rows.append({"op": name, "impl": label, **roofline(t, nbytes, flops, ceil),
                             "err_vs_torch": rel_err(out, want)})
    rows += bench_flashinfer(inp, args, want, device, quick, ceil, nbytes, flops)
    return rows


def bench_flashinfer(inp, args, want, device, quick, ceil, nbytes, flops) -> list[dict]:
    """FlashInfer through the registered backend: its append (write_kv) plus its paged prefill, and the
    prefill alone, on the same cache, q and new K/V."""
    if available_backends(device).get("flashinfer") is not None:
        return []
    fi = get_attention_backend("flashinfer", device)
    q, kv = args["q"], args["kv_cache"]
    page = kv.shape[2]
    reqs = [kvl.ScheduledRequest(c, n, ids) for (c, n), ids in zip(inp["_pairs"], inp["_ids"])]
    meta = kvl.build_attention_metadata(reqs, page, device, num_blocks=kv.shape[0])
    params = kvl.AttentionParams(q.shape[1], kv.shape[1], q.shape[2])
    out = torch.empty_like(q)

    def both():
        fi.write_kv(kv, args["k_new"], args["v_new"], meta.slot_mapping, validate=False)
        fi.forward(q, kv, meta, params, out=out, validate=False)
    fi.write_kv(kv, args["k_new"], args["v_new"], meta.slot_mapping)
    fi.forward(q, kv, meta, params, out=out)                             # plans, compiles
    err = rel_err(out, want)
    rows = [{"op": "paged_prefill_with_append", "impl": "flashinfer append + prefill",
             **roofline(timed(both, device, quick), nbytes, flops, ceil), "err_vs_torch": err}]
    t = timed(lambda: fi.forward(q, kv, meta, params, out=out, validate=False), device, quick)
    rows.append({"op": "paged_prefill_with_append", "impl": "flashinfer prefill only",
                 **roofline(t, nbytes, flops, ceil), "err_vs_torch": err})
    return rows


def bench_pages_and_merge(device, gen, quick: bool, ceil: dict) -> list[dict]:
    """copy_blocks of many attention pages (read + write bytes) and merge_states over split-KV partials."""
    rows = []
    nb, pages = (64, 16) if quick else (4096, 1024)
    shape = (nb, 8, 64, 256) if not quick else (nb, 2, 8, 64)
    cache = torch.empty(shape, dtype=torch.bfloat16 if device.type == "cuda" else torch.float16, device=device)
    perm = torch.randperm(nb, generator=gen)
    src, dst = perm[:pages].to(device), perm[pages:2 * pages].to(device)
    ops.copy_blocks(cache, src, dst)
    t = timed(lambda: ops.copy_blocks(cache, src, dst, validate=False), device, quick)
    nbytes = 2 * pages * cache[0].numel() * cache.element_size()
    rows.append({"op": f"copy_blocks {pages} pages of {cache[0].numel() * cache.element_size() >> 10} KiB",
                 "impl": "triton", **roofline(t, nbytes, 0.0, ceil)})
    # merge_states over split-KV partials: the shape of the issue, and what decode's combine step merges at
    # 8 x 8k (4 splits) and 1 x 128k (64 splits)
    shapes = [(8, 4, 4, 64)] if quick else [(64, 16, 32, 128), (8, 4, 32, 128), (1, 64, 32, 128)]
    for r, k, h, d in shapes:
        v = torch.randn(r, k, h, d, generator=gen).to(device)
        s = torch.randn(r, k, h, generator=gen).to(device)
        out, lse = torch.empty(r, h, d, device=device), torch.empty(r, h, device=device)
        ops.merge_states(v, s, out=out, lse_out=lse)
        nbytes = (v.numel() + s.numel() + out.numel() + lse.numel()) * 4
        t = timed(lambda: ops.merge_states(v, s, out=out, lse_out=lse, validate=False), device, quick)
        rows.append({"op": f"merge_states {k} states, [{r}, {h}, {d}] fp32", "impl": "triton",
                     **roofline(t, nbytes, 0.0, ceil)})
    return rows


def run(quick: bool, sweep: bool = False) -> list[dict]:
    """Every measurement as a list of rows (dicts); the first row holds the ceilings and the device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    ceil = measure_ceilings(device, quick)
    rows = [ceilings_row(ceil, device)]
    rows += bench_prefill(device, gen, quick, ceil, sweep)
    rows += bench_pages_and_merge(device, gen, quick, ceil)
    return rows


def print_table(rows: list[dict]) -> None:
    c = rows[0]
    print(f"\n{c['impl']}  |  torch {c['torch']}, triton {c['triton']}"
          + (f", flashinfer {c['flashinfer']}" if "flashinfer" in c else ""))
    print(f"ceilings (this run): copy {c['copy_TBps']:.2f} TB/s, bf16 matmul {c['matmul_TFLOPs']:.0f} TFLOP/s")
    print(f"{'op':<44}{'impl':<40}{'time us':>10}{'TB/s':>8}{'TFLOP/s':>9}{'binds':>8}{'% bound':>9}{'err':>10}")
    for r in rows[1:]:
        if "error" in r:
            print(f"{r['op']:<44}{r['impl']:<40}  failed: {r['error']}")
            continue
        err = f"{r['err_vs_torch']:.1e}" if "err_vs_torch" in r else "-"
        print(f"{r['op']:<44}{r['impl']:<40}{r['seconds'] * 1e6:>10.1f}{r['TBps']:>8.3f}{r['TFLOPs']:>9.1f}"
              f"{r['binds']:>8}{r['pct_of_bound']:>8.0f}%{err:>10}  {r.get('note', '')}")


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (runs under the CPU interpreter)")
    ap.add_argument("--sweep", action="store_true", help="also time the prefill kernel over tile configs")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    rows = run(args.quick, sweep=args.sweep)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
