"""Host cost of one engine step's metadata: ``build_attention_metadata`` (schedule checks included) and
``validate_attention_metadata``, and ``StepBuffers.build`` (persistent buffers for CUDA graphs), in CPU microseconds, on the step shapes a serving engine runs.

    python tools/bench_host.py [--threads 1] [--reps 50] [--device cpu|cuda] [--profile] [--json rows.json]

Host time is what the GPU waits for without CUDA graphs, so it is timed on the host clock alone (median
of ``--reps`` calls after warm-up), with one torch thread unless told otherwise. Block ids are a random
permutation of the pool, as after some hours of serving. ``--device cuda`` includes the copies to the
device (pinned, non-blocking). ``--profile`` also prints, for the largest decode step, the torch ops that
take the host time of each column (``torch.profiler``; on CUDA with CUDA activity, so the ``cuda*`` runtime
calls — copies, event waits, pinned allocations — are rows of their own), so a
slow column can be taken apart without another tool.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Optional

import numpy as np
import torch

from bench_common import host_time

import kvlayout as kvl

BLOCK = 16
# (name, [(cached tokens, new tokens)] per request)
STEPS = [
    ("1 decode @4096", [(4095, 1)]),
    ("64 decodes @4096", [(4095, 1)] * 64),
    ("256 decodes @512", [(511, 1)] * 256),
    ("256 decodes @4096", [(4095, 1)] * 256),
    ("60 decodes + 2048 chunk", [(4095, 1)] * 60 + [(0, 2048)]),
]


def requests_for(step: list[tuple[int, int]], rng: np.random.Generator, shared_prefix_blocks: int = 0):
    """Scheduled requests with block ids drawn from a shuffled pool; with ``shared_prefix_blocks``, every
    request starts with the same full prefix blocks (the ids returned as the shared set)."""
    need = [-(-(c + n) // BLOCK) for c, n in step]
    pool = rng.permutation(sum(need) + shared_prefix_blocks + 8)
    shared = pool[:shared_prefix_blocks].tolist()
    at = shared_prefix_blocks
    reqs = []
    for (c, n), k in zip(step, need):
        own = k - shared_prefix_blocks if c >= shared_prefix_blocks * BLOCK else k
        ids = (shared if own < k else []) + pool[at:at + own].tolist()
        at += own
        reqs.append(kvl.ScheduledRequest(c, n, ids))
    return reqs, shared, len(pool)


def block_table_time(reqs, num_blocks: int, device: str, reps: int, buffers=None, decode_only: bool = False
                     ) -> float:
    """Median host seconds of one step on a persistent ``BlockTable`` that holds the requests' rows: a
    sixteenth of the requests get their next block (decodes cross a block boundary every 16 steps; one
    ``append_many``), then
    the step's metadata is built (``table.build``, or with ``buffers`` the padded ``StepBuffers`` of a
    CUDA-graph step, ``buffers.build_from_table``). Between timed steps those blocks are dropped again
    (untimed)."""
    width = max(len(r.block_ids) for r in reqs)
    table = kvl.BlockTable(BLOCK, num_blocks=num_blocks, max_num_reqs=len(reqs), max_blocks_per_request=width,
                           max_num_tokens=sum(r.num_new_tokens for r in reqs), device=device)
    growing = list(range(0, len(reqs), 16))
    for i, r in enumerate(reqs):
        table.add(i, r.block_ids[:-1] if i in growing else r.block_ids)
    ids, computed, new = list(range(len(reqs))), [r.num_computed_tokens for r in reqs], [r.num_new_tokens for r in reqs]
    times = []
    for rep in range(reps + 3):
        t0 = time.perf_counter()
        table.append_many(growing, [reqs[i].block_ids[-1:] for i in growing])
        if buffers is None:
            table.build(ids, computed, new)
        else:
            buffers.build_from_table(table, ids, computed, new, num_reqs=len(ids), num_tokens=sum(new),
                                     decode_only=decode_only)
        times.append(time.perf_counter() - t0)
        for i in growing:
            table.truncate(i, len(reqs[i].block_ids) - 1)
    return statistics.median(times[3:])


def run_rows(reps: int, device: str) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for name, step in STEPS:
        for prefix in (0, 8):
            reqs, shared, num_blocks = requests_for(step, rng, prefix)
            build = lambda: kvl.build_attention_metadata(reqs, BLOCK, device, num_blocks=num_blocks,  # noqa: E731
                                                         shared_block_ids=shared or None)
            meta = build()
            t_build = host_time(build, reps, warmup=3)
            t_valid = host_time(lambda: kvl.validate_attention_metadata(meta, shared_block_ids=shared or None),
                                reps, warmup=3)
            row = {"step": name + (f", {prefix}-block shared prefix" if prefix else ""),
                   "requests": len(reqs), "build_us": t_build * 1e6, "validate_us": t_valid * 1e6}
            if not prefix:                      # the persistent, padded buffers of CUDA-graph steps
                tokens = sum(n for _, n in step)
                bufs = kvl.StepBuffers(BLOCK, num_blocks=num_blocks, max_num_reqs=len(reqs), max_num_tokens=tokens,
                                       max_blocks_per_request=max(-(-(c + n) // BLOCK) for c, n in step),
                                       device=device)
                decode_only = all(n == 1 for _, n in step)
                row["buffers_us"] = 1e6 * host_time(lambda: bufs.build(reqs, num_reqs=len(reqs), num_tokens=tokens,
                                                                      decode_only=decode_only), reps, warmup=3)
                row["table_us"] = 1e6 * block_table_time(reqs, num_blocks, device, reps)
                row["table_buffers_us"] = 1e6 * block_table_time(reqs, num_blocks, device, reps, bufs, decode_only)
            rows.append(row)
    return rows


def profile_step(device: str, top: int = 12) -> None:
    """Per-op host time of each column for the ``256 decodes @4096`` step (20 calls each)."""
    from torch.profiler import ProfilerActivity, profile
    step = dict(STEPS)["256 decodes @4096"]
    reqs, _, num_blocks = requests_for(step, np.random.default_rng(0))
    tokens = sum(n for _, n in step)
    bufs = kvl.StepBuffers(BLOCK, num_blocks=num_blocks, max_num_reqs=len(reqs), max_num_tokens=tokens,
                           max_blocks_per_request=max(len(r.block_ids) for r in reqs), device=device)
    calls = {
        "build_attention_metadata": lambda: kvl.build_attention_metadata(reqs, BLOCK, device, num_blocks=num_blocks),
        "StepBuffers.build": lambda: bufs.build(reqs, num_reqs=len(reqs), num_tokens=tokens, decode_only=True),
        "BlockTable + StepBuffers.build_from_table":
            lambda: block_table_time(reqs, num_blocks, device, 20, bufs, True),
    }
    for name, fn in calls.items():
        fn()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            for _ in range(1 if name.startswith("BlockTable") else 20):
                fn()
        print(f"\n{name} (256 decodes @4096, metadata on {device}): ops by self host time, 20 calls")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--device", default="cpu", help="where the metadata tensors go (cpu or cuda)")
    ap.add_argument("--profile", action="store_true", help="per-op host time of the 256-decode step")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run_rows(args.reps, args.device)
    print(f"host cost per step (median of {args.reps}, {args.threads} thread(s), metadata on {args.device})")
    print("columns: build_attention_metadata | StepBuffers.build (padded, from block ids) | BlockTable (append "
          "+ build) | BlockTable + StepBuffers.build_from_table (padded) | validate_attention_metadata")
    print(f"{'step':<52}{'build us':>10}{'StepBuffers us':>16}{'BlockTable us':>15}{'table+buffers us':>18}"
          f"{'validate us':>13}")
    for r in rows:
        cols = [f"{r[k]:.0f}" if k in r else "-" for k in ("buffers_us", "table_us", "table_buffers_us")]
        print(f"{r['step']:<52}{r['build_us']:>10.0f}{cols[0]:>16}{cols[1]:>15}{cols[2]:>18}{r['validate_us']:>13.0f}")
    if args.profile:
        profile_step(args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
