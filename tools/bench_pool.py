"""Host cost of the page pool (``kvlayout.page_pool``) on the steps a serving engine runs, in CPU µs.

    python tools/bench_pool.py [--reps 200] [--json rows.json]

Plans: Nemotron-H-8B (hybrid: 1 attention + 6 Mamba groups on one pool, 40 GiB) and Llama-3.1-8B (dense).
The pool is first aged: requests admitted and finished in random order until the free lists are shuffled.
Rows: a 256-request decode step where every request crosses a page (one page each, allocated and freed
in one call each), the same step where 1 in 16 crosses (block 16), admitting and finishing one 8K request
(512 pages plus one state per Mamba group), and the pool's ownership check inside
``build_attention_metadata`` for 256 decodes at 1K (metadata built with and without ``pool=``).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from bench_common import host_time

import kvlayout as kvl
from kvlayout import hf_config as hf
from kvlayout.page_pool import PagePool


def aged_pool(plan, rng) -> PagePool:
    pool = PagePool(plan)
    live = []
    for _ in range(200):
        if live and rng.random() < 0.5:
            for g, ids in live.pop(int(rng.integers(len(live)))):
                pool.free(g, ids)
            continue
        n = int(rng.integers(1, 600))
        try:
            live.append([(g.index, pool.allocate(g.index, n if g.block_size else 1)) for g in plan.groups])
        except kvl.KVLayoutError:
            pass
    return pool


def rows_for(model: str, reps: int) -> list[dict]:
    specs = hf.specs_from_hf_config(hf.load_hf_config(model), block_size=16)
    plan = kvl.plan_kv_cache(specs, 40 << 30)
    rng = np.random.default_rng(0)
    pool = aged_pool(plan, rng)
    attn = next(g.index for g in plan.groups if g.block_size)
    out = []

    def step(n):
        ids = pool.allocate_many(attn, [1] * n)
        pool.free_many(attn, ids)

    for name, n in (("256 decodes, every one crosses a page", 256), ("256 decodes, 1 in 16 crosses", 16)):
        out.append({"model": model, "step": name, "us": 1e6 * host_time(lambda: step(n), reps, warmup=5)})

    def admit():
        held = [(g.index, pool.allocate(g.index, 512 if g.block_size else 1)) for g in plan.groups]
        for g, ids in held:
            pool.free(g, ids)

    out.append({"model": model, "step": "admit + finish one 8K request", "us": 1e6 * host_time(admit, reps, warmup=5)})
    pool = PagePool(plan)                                # a fresh one: the aged pool may lack 16,384 pages
    reqs = [kvl.ScheduledRequest(1023, 1, pool.allocate(attn, 64)) for _ in range(256)]
    plain = lambda: kvl.build_attention_metadata(reqs, plan, group=attn)  # noqa: E731
    checked = lambda: kvl.build_attention_metadata(reqs, plan, group=attn, pool=pool)  # noqa: E731
    t0, t1 = host_time(plain, reps // 4 + 1, warmup=2), host_time(checked, reps // 4 + 1, warmup=2)
    out.append({"model": model, "step": "metadata 256 decodes @1024: pool ownership check", "us": 1e6 * (t1 - t0),
                "of": 1e6 * t1})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (50)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    reps = 50 if args.quick else args.reps
    rows = [r for m in ("nemotron-h-8b", "llama-3.1-8b") for r in rows_for(m, reps)]
    from rich.console import Console
    from rich.table import Table
    table = Table(title="page pool host cost (CPU µs, median)", title_justify="left")
    for col in ("model", "step", "µs"):
        table.add_column(col, justify="right" if col == "µs" else "left")
    for r in rows:
        table.add_row(r["model"], r["step"], f"{r['us']:.1f}" + (f" (of {r['of']:.0f})" if "of" in r else ""))
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
