"""Attention variants next to dense decode on the same inputs: block-sparse decode (a fraction of the pages
selected), gated decode, and tree attention for speculative decoding (next to FlashInfer's custom-mask
prefill over the same pages when FlashInfer is installed). 32 query / 8 KV heads, D=128, bf16, block 16,
pages in random order; triton.testing.do_bench medians (L2 flushed) of eager calls and of replays of a CUDA
graph of one call (the kernels alone: eager small ops are bound by their launches); the copy ceiling from
the same run.

    python tools/bench_variants.py [--batch 8] [--context 32768] [--drafts 64] [--json rows.json]

Bytes are counted from the inputs: the K/V a call reads (only the selected pages for sparse decode; plus
the gates for gated decode), q and out. Sparse decode's time should follow the pages it reads; the graph
column shows whether it does.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Optional

import torch

from bench_attention import Setup, make_step
from bench_common import device_name, graph_time, measure_ceilings, timed

import kvlayout as kvl
from kvlayout import ops
from kvlayout.registry import available_backends


def both(fn) -> dict:
    """Eager and graph-replay seconds of ``fn`` (graph None where the op cannot be captured)."""
    row = {"seconds": timed(fn, "cuda")}
    try:
        row["graph_seconds"] = graph_time(fn)
    except Exception as e:                                   # say why, keep the eager number
        row["graph_seconds"], row["graph_error"] = None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return row


def rows_sparse_gated(s: Setup, batch: int, context: int, device, gen) -> list[dict]:
    kv, meta, q = make_step([(context - 1, 1)] * batch, s, device, gen)
    params = kvl.AttentionParams(s.heads, s.kv_heads, s.head_size)
    el = s.dtype.itemsize
    per_token = s.kv_heads * 2 * s.head_size * el
    qo = 2 * batch * s.heads * s.head_size * el
    dense = kvl.get_attention_backend("triton", device)
    rows = []
    out = torch.empty_like(q)
    rows.append({"op": "dense decode", "fraction": 1.0, "bytes": batch * context * per_token + qo,
                 **both(lambda: dense.forward(q, kv, meta, params, out=out, validate=False))})
    pages = meta.block_table.shape[1]
    for frac in (1 / 16, 1 / 4, 1.0):
        k = max(1, int(pages * frac))
        sel = torch.stack([torch.sort(torch.randperm(pages, device=device, generator=gen)[:k]).values
                           for _ in range(batch)]).to(torch.int32)
        rows.append({"op": "sparse decode", "fraction": k / pages, "bytes": batch * k * s.block_size * per_token + qo,
                     **both(lambda: ops.sparse_decode(q, kv, meta.block_table, meta.seq_lens, sel, impl="triton",
                                                      out=out, validate=False))})
    delta = torch.randn(kv.shape[0], s.kv_heads, s.block_size, device=device, generator=gen)
    alpha = torch.randn(batch, s.heads, device=device, generator=gen)
    rows.append({"op": "gated decode", "fraction": 1.0, "bytes": batch * context * (per_token + 4 * s.kv_heads) + qo,
                 **both(lambda: ops.gated_decode(q, kv, delta, alpha, meta.block_table, meta.seq_lens, impl="triton",
                                                 out=out, validate=False))})
    return rows


def rows_tree(s: Setup, batch: int, prefix: int, drafts: int, device, gen, have_fi: bool) -> list[dict]:
    rnd = random.Random(0)
    parents = [[-1 if i == 0 or rnd.random() < 0.2 else rnd.randrange(i) for i in range(drafts)]
               for _ in range(batch)]
    kv, meta, q = make_step([(prefix, drafts)] * batch, s, device, gen)
    k = torch.randn(q.shape[0], s.kv_heads, s.head_size, device=device, dtype=s.dtype, generator=gen)
    v = torch.randn_like(k)
    masks = ops.tree_masks(parents, device)
    lens = meta.seq_lens - drafts
    el = s.dtype.itemsize
    nbytes = batch * (prefix + drafts) * s.kv_heads * 2 * s.head_size * el + 2 * q.numel() * el
    rows = []
    rows.append({"op": "tree attention", "impl": "triton", "bytes": nbytes,
                 **both(lambda: ops.tree_attention(q, k, v, kv, meta.query_start_loc, lens, meta.block_table, masks,
                                                   impl="triton", validate=False, max_drafts=drafts))})
    rows.append({"op": "causal chunk (same shape)", "impl": "triton", "bytes": nbytes,
                 **both(lambda: ops.paged_prefill_with_append(q, k, v, kv, meta.query_start_loc, lens,
                                                              meta.block_table, impl="triton", validate=False))})
    if have_fi:
        try:
            rows.append({"op": "tree attention", "impl": "flashinfer custom mask", "bytes": nbytes,
                         "seconds": flashinfer_tree(kv, meta, q, parents, prefix, drafts, s, device)})
        except Exception as e:                                # an API this FlashInfer build lacks: say so
            rows.append({"op": "tree attention", "impl": "flashinfer custom mask", "bytes": nbytes,
                         "seconds": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
    return rows


def flashinfer_tree(kv, meta, q, parents, prefix: int, drafts: int, s: Setup, device) -> float:
    """FlashInfer's paged prefill with a custom mask (prefix visible, drafts by the tree), same pages."""
    import flashinfer
    b = len(parents)
    n = s.block_size
    pages = -(-(prefix + drafts) // n)
    indptr = torch.arange(0, (b + 1) * pages, pages, device=device, dtype=torch.int32)
    indices = meta.block_table[:, :pages].reshape(-1).contiguous()
    last = torch.full((b,), (prefix + drafts) - (pages - 1) * n, device=device, dtype=torch.int32)
    masks = []
    for par in parents:
        anc = torch.zeros(drafts, drafts, dtype=torch.bool)
        for i, p in enumerate(par):
            anc[i] = anc[p] if p >= 0 else False
            anc[i, i] = True
        masks.append(torch.cat([torch.ones(drafts, prefix, dtype=torch.bool), anc], 1).reshape(-1))
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, kv_layout="HND")
    w.plan(meta.query_start_loc, indptr, indices, last, s.heads, s.kv_heads, s.head_size, n,
           custom_mask=torch.cat(masks).to(device), q_data_type=s.dtype, kv_data_type=s.dtype)
    d = s.head_size
    return timed(lambda: w.run(q, (kv[..., :d], kv[..., d:])), device)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--tree-batch", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=4096)
    ap.add_argument("--drafts", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_variants needs a CUDA device")
        return 2
    device = torch.device("cuda")
    s = Setup(32, 8, 128, 16, torch.bfloat16)
    gen = torch.Generator(device).manual_seed(0)
    ceil = measure_ceilings(device)
    have_fi = available_backends(device).get("flashinfer") is None
    rows = rows_sparse_gated(s, args.batch, args.context, device, gen)
    rows += rows_tree(s, args.tree_batch, args.prefix, args.drafts, device, gen, have_fi)
    copy = ceil["copy_TBps"]
    print(f"{device_name(device)}: copy ceiling {copy:.2f} TB/s (this run); decode {args.batch} x {args.context}, "
          f"tree {args.tree_batch} x ({args.prefix} + {args.drafts} drafts)")
    print(f"{'op':<28}{'impl / pages read':<26}{'eager us':>10}{'TB/s':>8}{'graph us':>10}{'TB/s':>8}"
          f"{'% copy':>8}")
    for r in rows:
        what = r.get("impl") or f"{100 * r['fraction']:.1f}% of pages"
        if r["seconds"] is None:
            print(f"{r['op']:<28}{what:<26}  failed: {r['error']}")
            continue
        g = r.get("graph_seconds")
        best = min(r["seconds"], g) if g else r["seconds"]
        cols = f"{r['seconds'] * 1e6:>10.1f}{r['bytes'] / r['seconds'] / 1e12:>8.2f}"
        cols += f"{g * 1e6:>10.1f}{r['bytes'] / g / 1e12:>8.2f}" if g else f"{'-':>10}{'-':>8}"
        print(f"{r['op']:<28}{what:<26}{cols}{100 * r['bytes'] / best / 1e12 / copy:>7.0f}%"
              + (f"  (graph: {r['graph_error']})" if r.get("graph_error") else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceilings": ceil, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
