"""The decode grid of the performance issue in one table: batch {1, 2, 4, 8, 16, 64, 256} x context {512, 2k,
8k, 32k, 128k}, the ``triton`` backend next to FlashInfer on the same inputs (32 query / 8 KV heads, D=128,
bf16, block 16, pages in random order), each timed eagerly *and* as a replayed CUDA graph (the graph shows
the kernels alone; eager adds the launch cost), next to the copy ceiling measured in the same run.

    python tools/bench_decode_grid.py [--batches 1,2,4,8,16,64,256] [--contexts 512,2048,8192,32768,131072]
                                      [--max-gib 40] [--fp8] [--variants two-launch,bn128] [--json rows.json]

Bytes are counted from the inputs (the cached K/V read once, q, out, the block table). Cells whose cache
would exceed ``--max-gib`` are skipped and listed. ``--fp8`` times every cell a second time with the same
values in an e4m3 cache (per-head scales), and prints fp8 time over bf16 time. ``--variants`` adds rows of the split-KV decode kernel launched directly with
other launch choices (``VARIANTS``: the merge in its own launch, other key tiles, other split counts), so a
launch choice is judged against the default on every cell of one run. Timing: CUDA events around
20 back-to-back calls (or replays), median of 5, after warm-up; no L2 flush, as the layers of a step run.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional

import torch

from bench_attention import Setup, attn_bytes, make_step
from bench_common import device_name, graph_time, measure_ceilings, timed

import kvlayout as kvl
from kvlayout.kernels.decode import (DecodeConfig, SplitWorkspace, choose_num_splits, decode_config, device_sms,
                                     split_kv_decode)
from kvlayout.registry import available_backends, get_attention_backend

ITERS = 20

# name -> (DecodeConfig, or None for the default one; min_tokens_per_split of the split count)
VARIANTS = {
    "default": (None, 512),
    "two-launch": (DecodeConfig(64, 4, 3, fused_merge=False), 512),
    "bn128": (DecodeConfig(128, 4, 3), 512),
    "bn128w8": (DecodeConfig(128, 8, 3), 512),
    "split256": (None, 256),
    "split1024": (None, 1024),
}


class DecodeVariant:
    """The split-KV decode kernel with one launch choice fixed, behind the backend's ``forward`` signature
    (decode-only steps); its workspace is made before any timing or capture."""

    def __init__(self, name: str, meta, params, device):
        self.name = f"triton:{name}"
        cfg, min_tokens = VARIANTS[name]
        self.cfg = cfg or decode_config(params.head_size, 2, False)
        self.splits = choose_num_splits(meta.num_reqs, params.num_kv_heads, meta.max_seq_len, device_sms(device),
                                        min_tokens_per_split=min_tokens)
        self.ws = (SplitWorkspace.make(meta.num_reqs, params.num_heads, params.num_kv_heads, self.splits,
                                       params.head_size, device) if self.splits > 1 else None)

    def forward(self, q, kv, meta, params, *, out, k_scale=None, v_scale=None, validate=False):
        split_kv_decode(q, kv, meta.query_start_loc, meta.seq_lens, meta.block_table, params,
                        max_seq_len=meta.max_seq_len, num_splits=self.splits, k_scale=k_scale, v_scale=v_scale,
                        out=out, workspace=self.ws, config=self.cfg)


def events_time(fn: Callable[[], object]) -> float:
    return timed(fn, "cuda", iters=ITERS)


def graph_replay_time(fn: Callable[[], object]) -> float:
    return graph_time(fn, iters=ITERS)


def cell(batch: int, context: int, s: Setup, backends: list, device, gen, fp8: bool = False,
         variants: tuple = ()) -> list[dict]:
    pairs = [(context - 1, 1)] * batch
    kv16, meta, q = make_step(pairs, s, device, gen)
    params = kvl.AttentionParams(s.heads, s.kv_heads, s.head_size)
    backends = list(backends) + [DecodeVariant(v, meta, params, device) for v in variants]
    out = torch.empty_like(q)
    rows = []
    kinds = [("bf16", kv16, None)]
    if fp8:                          # the same values stored as e4m3 with per-head scales of 1
        kinds.append(("fp8", kv16.to(torch.float8_e4m3fn), torch.ones(s.kv_heads, device=device)))
    for kv_name, kv, scale in kinds:
        nbytes = attn_bytes(pairs, s) - (sum(pairs[0]) * batch * s.kv_heads * 2 * s.head_size if scale is not None
                                         else 0)
        for be in backends:
            def call(be=be, kv=kv, scale=scale):
                be.forward(q, kv, meta, params, out=out, k_scale=scale, v_scale=scale, validate=False)
            row = {"batch": batch, "context": context, "backend": be.name, "kv": kv_name, "bytes": nbytes}
            if isinstance(be, DecodeVariant):
                row.update(splits=be.splits, config=repr(be.cfg))
            for mode, timer in (("eager", events_time), ("graph", graph_replay_time)):
                try:
                    if mode == "graph" and hasattr(be, "plan"):
                        # FlashInfer: a fresh backend (its graph buffers are sized by the first plan) and its
                        # CUDA-graph plan, made before capture
                        gbe = type(be)()
                        gbe.plan(meta, params, kv.dtype, q.dtype, cuda_graph=True)

                        def call(be=gbe, kv=kv, scale=scale):
                            be.forward(q, kv, meta, params, out=out, k_scale=scale, v_scale=scale, validate=False)
                    row[f"{mode}_s"] = timer(call)
                except Exception as e:                   # e.g. a backend that cannot be captured
                    row[f"{mode}_s"] = None
                    row[f"{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            rows.append(row)
    del kinds, kv16, q, out, meta
    torch.cuda.empty_cache()
    return rows


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,2,4,8,16,64,256")
    ap.add_argument("--contexts", default="512,2048,8192,32768,131072")
    ap.add_argument("--backends", default="triton,flashinfer")
    ap.add_argument("--max-gib", type=float, default=40.0)
    ap.add_argument("--fp8", action="store_true", help="also time each cell with an fp8 (e4m3) cache")
    ap.add_argument("--variants", default="", help=f"extra kernel rows, of: {', '.join(VARIANTS)}")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        print("bench_decode_grid needs a CUDA device (it times CUDA-graph replay)")
        return 2
    device = torch.device("cuda")
    s = Setup(32, 8, 128, 16, torch.bfloat16)
    usable = [n for n in args.backends.split(",") if available_backends(device).get(n) is None]
    backends = [get_attention_backend(n, device) for n in usable]
    ceil = measure_ceilings(device)
    gen = torch.Generator(device).manual_seed(0)
    rows, skipped = [], []
    for b in (int(x) for x in args.batches.split(",")):
        for c in (int(x) for x in args.contexts.split(",")):
            gib = b * c * s.kv_heads * 2 * s.head_size * s.dtype.itemsize / 2 ** 30
            if gib > args.max_gib:
                skipped.append(f"{b}x{c} ({gib:.0f} GiB)")
                continue
            print(f"... {b} x {c}", file=sys.stderr, flush=True)
            rows += cell(b, c, s, backends, device, gen, args.fp8, variants)
    copy = ceil["copy_TBps"]
    peer = "flashinfer" if "flashinfer" in usable else None
    print(f"{device_name(device)}: copy ceiling {copy:.2f} TB/s (this run); decode, 32 q / 8 KV heads, D=128, bf16, "
          f"block 16")
    print(f"{'batch x context':<16}{'backend':<22}{'eager us':>10}{'TB/s':>7}{'graph us':>10}{'TB/s':>7}"
          f"{'% copy':>8}{'x FI eager':>11}{'x FI graph':>11}")
    for r in rows:
        p = next((x for x in rows if peer and x["backend"] == peer and x["batch"] == r["batch"]
                  and x["context"] == r["context"] and x["kv"] == r["kv"]), None)

        def fmt(key, ref=None):
            v = r.get(key)
            return "-" if v is None else f"{v * 1e6:.1f}"

        def tb(key):
            v = r.get(key)
            return "-" if v is None else f"{r['bytes'] / v / 1e12:.2f}"

        def ratio(key):
            if p is None or p is r or p.get(key) is None or r.get(key) is None:
                return "-"
            return f"{p[key] / r[key]:.2f}"
        pct = "-" if r.get("graph_s") is None else f"{100 * r['bytes'] / r['graph_s'] / 1e12 / copy:.0f}%"
        name = r["backend"] + ("" if r["kv"] == "bf16" else " " + r["kv"])
        print(f"{str(r['batch']) + ' x ' + str(r['context']):<16}{name:<22}{fmt('eager_s'):>10}"
              f"{tb('eager_s'):>7}{fmt('graph_s'):>10}{tb('graph_s'):>7}{pct:>8}{ratio('eager_s'):>11}"
              f"{ratio('graph_s'):>11}")
        for mode in ("eager", "graph"):
            if f"{mode}_error" in r:
                print(f"    {mode} failed: {r[mode + '_error']}")
    fp8_rows = [r for r in rows if r["kv"] == "fp8"]
    if fp8_rows:
        print("fp8 time / bf16 time, same shape and backend (target <= 0.55):")
        for r in fp8_rows:
            b16 = next(x for x in rows if x["kv"] == "bf16" and x["backend"] == r["backend"]
                       and x["batch"] == r["batch"] and x["context"] == r["context"])
            ratios = [f"{m} {r[m + '_s'] / b16[m + '_s']:.2f}" for m in ("eager", "graph")
                      if r.get(m + "_s") and b16.get(m + "_s")]
            print(f"  {r['batch']} x {r['context']} {r['backend']}: {', '.join(ratios) or 'failed'}")
    if skipped:
        print(f"skipped (over {args.max_gib:g} GiB of cache): {', '.join(skipped)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceilings": ceil, "rows": rows, "skipped": skipped}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
