"""Benchmark the NIXL connector: descriptors and preparation cost per request, and transfer bandwidth.

Model: a Llama-3.1-8B-like cache (32 layers, 8 KV heads, head size 128, bf16, block 16); one request of
4096 tokens (256 blocks). Three parts:

1. Descriptors per transfer (counted from virtual regions, no memory): the packed layout (one region per
   layer), its cross-layer variant (one region), and the older layout with K and V as separate regions per
   layer, for contiguous, fragmented and random block ids, and for a TP1 -> TP2 head-sliced read. Counted the
   same way for every layout: indices named per transfer, then descriptors after coalescing adjacent blocks.
   With the time our connector spends turning block ids into indices (its whole per-request preparation).
2. NIXL's own per-request preparation (``make_prepped_xfer`` on lists prepared once), per layout, between
   two agents in this process over registered (untouched) memory.
3. The transfer: a prefill engine in a child process holds the request; this process's connector pulls it
   (``start_load`` -> ``poll`` until finished). Bytes/s next to a torch copy of the same bytes in one
   process (contiguous, and gathered block by block). The connector's cost (index building, bookkeeping,
   polls) is reported apart from NIXL's prepare and from the transport (post -> done).

    python tools/bench_transfer.py [--quick] [--device cpu|cuda] [--json out.json]

``run(quick) -> list[dict]`` is ``kvlayout bench``'s entry point (CPU memory, as the command's default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("UCX_NET_DEVICES", "lo")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_common import ceilings_row, host_time, measure_ceilings  # noqa: E402

import kvlayout as kvl  # noqa: E402
from kvlayout.connectors.block_ids import as_block_ids  # noqa: E402
from kvlayout.connectors.descriptors import TransferPlan  # noqa: E402
from kvlayout.connectors.nixl_api import load_nixl_agent  # noqa: E402
from kvlayout.connectors.regions import Region, layer_regions  # noqa: E402
from kvlayout.connectors.topology import pair_regions  # noqa: E402

LAYERS, HEADS, HEAD_SIZE, DTYPE, BLOCK = 32, 8, 128, torch.bfloat16, 16
TOKENS = 4096


def model_specs(layers: int, heads: int = HEADS) -> dict:
    return {f"layers.{i}.attn": kvl.AttentionSpec(heads, HEAD_SIZE, DTYPE, BLOCK) for i in range(layers)}


def page_bytes(heads: int = HEADS) -> int:
    return heads * BLOCK * 2 * HEAD_SIZE * DTYPE.itemsize


def median_us(fn, reps: int) -> float:
    """Median host microseconds of ``reps`` calls after one warm-up."""
    return host_time(fn, reps, warmup=1) * 1e6


# ----------------------------------------------------------------------------- 1. descriptor counts

def virtual_regions(layout: str, layers: int, heads: int, num_blocks: int, base: int) -> list[Region]:
    """Regions of a cache at a made-up address: 'packed' (per layer), 'cross' (one), 'kv_split' (K, V apart)."""
    page = page_bytes(heads)
    if layout == "packed":
        return [Region((f"l{i}",), "attention", 0, base + i * num_blocks * page, page, page, num_blocks, heads)
                for i in range(layers)]
    if layout == "cross":
        return [Region(tuple(f"l{i}" for i in range(layers)), "attention", 0, base, layers * page, layers * page,
                       num_blocks, 1)]
    half = page // 2                    # K or V of one block: (H, N, D), heads outermost (HND)
    return [Region((f"l{i}.{kv}",), "attention", 0, base + (2 * i + j) * num_blocks * half, half, half, num_blocks,
                   heads) for i in range(layers) for j, kv in enumerate("kv")]


def block_patterns(n: int, num_blocks: int, rng) -> dict:
    runs = rng.permutation(num_blocks // 8)[: n // 8]
    frag_l = (runs[:, None] * 8 + np.arange(8)).ravel()
    frag_r = (rng.permutation(num_blocks // 8)[: n // 8][:, None] * 8 + np.arange(8)).ravel()
    return {
        "contiguous": (np.arange(n), np.arange(n) + num_blocks - n),
        "runs of 8": (frag_l, frag_r),
        "random": (rng.permutation(num_blocks)[:n], rng.permutation(num_blocks)[:n]),
    }


def descriptor_table(reps: int) -> list[dict]:
    n, num_blocks = TOKENS // BLOCK, 4096
    rng = np.random.default_rng(0)
    rows = []
    for layout in ("packed", "cross", "kv_split"):
        local = virtual_regions(layout, LAYERS, HEADS, num_blocks, 1 << 40)
        remote = {r.layers[0]: r for r in virtual_regions(layout, LAYERS, HEADS, num_blocks, 1 << 44)}
        zero = {name: 0 for name in remote}
        plan = TransferPlan(pair_regions(local, remote, zero, zero))
        for pattern, (lid, rid) in block_patterns(n, num_blocks, rng).items():
            li, ri = as_block_ids(lid, "l"), as_block_ids(rid, "r")
            idx = plan.indices(li, ri)[0].size
            desc = plan.descriptors(li, ri)[0].size
            us = median_us(lambda: plan.indices(as_block_ids(lid, "l"), as_block_ids(rid, "r")), reps)
            rows.append({"layout": layout, "blocks": pattern, "regions": len(plan.pairs), "indices": idx,
                         "descriptors": desc, "index_us": us})
    # TP1 prefill -> TP2 decode rank 1: heads 4..7 of every block (a contiguous slice in HND order)
    for layout in ("packed", "kv_split"):
        local = virtual_regions(layout, LAYERS, HEADS // 2, num_blocks, 1 << 40)
        remote = {r.layers[0]: r for r in virtual_regions(layout, LAYERS, HEADS, num_blocks, 1 << 44)}
        plan = TransferPlan(pair_regions(local, remote, {k: HEADS // 2 for k in remote}, {k: 0 for k in remote}))
        lid, rid = np.arange(n), np.arange(n) + num_blocks - n
        li, ri = as_block_ids(lid, "l"), as_block_ids(rid, "r")
        rows.append({"layout": layout, "blocks": "contiguous, TP1->TP2 heads", "regions": len(plan.pairs),
                     "indices": plan.indices(li, ri)[0].size, "descriptors": plan.descriptors(li, ri)[0].size,
                     "index_us": median_us(lambda: plan.indices(as_block_ids(lid, "l"), as_block_ids(rid, "r")), reps)})
    return rows


# ------------------------------------------------------------------------- 2. NIXL's prepare per request

def nixl_prepare_table(layers: int, device: str, reps: int) -> list[dict]:
    nixl_agent, nixl_agent_config = load_nixl_agent()

    n = TOKENS // BLOCK
    num_blocks = 2 * n
    plan = kvl.plan_kv_cache(model_specs(layers), num_blocks * page_bytes() * layers)
    a = kvl.allocate_kv_cache(plan, device, zero=False)          # untouched memory: only addresses matter
    b = kvl.allocate_kv_cache(plan, device, zero=False)
    mem = "VRAM" if device == "cuda" else "DRAM"
    dev = torch.device(device).index or 0
    cfg = nixl_agent_config(backends=["UCX"])
    ag_a, ag_b = nixl_agent("bench-a", cfg), nixl_agent("bench-b", cfg)
    ag_a.register_memory(list(a.buffers))
    ag_b.register_memory(list(b.buffers))
    peer = ag_a.add_remote_agent(ag_b.get_agent_metadata())
    peer = peer.decode() if isinstance(peer, bytes) else peer
    nb = plan.groups[0].num_blocks
    rows = []
    rng = np.random.default_rng(1)
    pats = {"contiguous": (np.arange(n), np.arange(n) + nb - n), "random": (rng.permutation(nb)[:n], rng.permutation(nb)[:n])}
    for layout in ("packed", "kv_split"):
        def regions(c):
            rs = layer_regions(c)
            if layout == "packed":
                return rs
            half = rs[0].block_len // 2        # same bytes seen as K and V regions, as the older layout had them
            return [Region(r.layers, r.kind, 0, r.base + j * r.num_blocks * half, half, half, r.num_blocks)
                    for r in rs for j in (0, 1)]
        la, lb = regions(a), regions(b)
        tplan = TransferPlan(list(zip(la, lb)))
        rows_l = np.array([(r.base, r.block_len, dev, r.block_stride, r.num_blocks) for r in la], dtype=np.uint64)
        rows_r = np.array([(r.base, r.block_len, dev, r.block_stride, r.num_blocks) for r in lb], dtype=np.uint64)
        hl = ag_a.prep_xfer_dlist("NIXL_INIT_AGENT", rows_l, mem)
        hr = ag_a.prep_xfer_dlist(peer, rows_r, mem)
        for pattern, (lid, rid) in pats.items():
            li, ri = tplan.indices(as_block_ids(lid, "l"), as_block_ids(rid, "r"))

            def make():
                ag_a.make_prepped_xfer("READ", hl, li, hr, ri, b"x").release()
            rows.append({"layout": layout, "layers": layers, "blocks": pattern, "indices": int(li.size),
                         "descriptors": int(tplan.descriptors(as_block_ids(lid, "l"), as_block_ids(rid, "r"))[0].size),
                         "nixl_prepare_us": median_us(make, reps)})
        hl.release()
        hr.release()
    return rows


# ------------------------------------------------------------------------------------ 3. the transfer

def serve(cfg: dict) -> None:
    """Child process: a prefill engine holding ``cfg['requests']`` requests on the same blocks."""
    from kvlayout.connectors import NixlConnector
    plan = kvl.plan_kv_cache(model_specs(cfg["layers"]), cfg["num_blocks"] * page_bytes() * cfg["layers"])
    caches = kvl.allocate_kv_cache(plan, cfg["device"], zero=False)
    gen = torch.Generator().manual_seed(5)
    for buf in caches.buffers:                                   # real bytes, resident pages
        buf.copy_(torch.randint(-128, 128, buf.shape, dtype=torch.int8, generator=gen))
    conn = NixlConnector(caches, specs=plan.specs, engine_id="bench-prefill", hold_timeout_s=3600)
    tokens = {f"r{i}": conn.hold_blocks(f"r{i}", cfg["block_ids"])["hold_token"] for i in range(cfg["requests"])}
    print("@@" + json.dumps({"address": conn.address, "tokens": tokens}), flush=True)
    import select
    while not select.select([sys.stdin], [], [], 0.001)[0]:
        conn.poll()
    conn.close()


def transfer_table(layers: int, device: str, iters: int) -> dict:
    from kvlayout.connectors import NixlConnector
    n = TOKENS // BLOCK
    num_blocks = 2 * n
    rng = np.random.default_rng(2)
    plan = kvl.plan_kv_cache(model_specs(layers), num_blocks * page_bytes() * layers)
    nb = plan.groups[0].num_blocks
    remote_ids = rng.permutation(nb)[:n].tolist()
    local_ids = rng.permutation(nb)[:n].tolist()
    child = subprocess.Popen([sys.executable, __file__, "--serve", json.dumps(
        {"layers": layers, "num_blocks": num_blocks, "device": device, "requests": iters + 1,
         "block_ids": remote_ids})], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("@@"):
            line = child.stdout.readline()
            if not line:
                raise RuntimeError("the prefill child exited before it was ready")
        ready = json.loads(line[2:])
        address, tokens = ready["address"], ready["tokens"]
        caches = kvl.allocate_kv_cache(plan, device)
        conn = NixlConnector(caches, specs=plan.specs, engine_id="bench-decode", telemetry=True)
        results, polls = [], []
        for i in range(iters + 1):                               # the first one includes the handshake
            rid = f"r{i}"
            t0 = time.perf_counter()
            conn.start_load(rid, address, remote_ids, local_ids, hold_token=tokens[rid])
            t1 = time.perf_counter()
            while True:
                tp = time.perf_counter()
                ev = conn.poll()
                polls.append(time.perf_counter() - tp)
                if ev.failed:
                    raise RuntimeError(f"load failed: {ev.failed}")
                if rid in ev.finished:
                    break
            t2 = time.perf_counter()
            if i:
                info = conn.transfer_info(rid)
                results.append((t1 - t0, t2 - t0, info))
        nbytes = results[0][2].nbytes
        conn.close()
    finally:
        child.stdin.close()
        child.wait(30)

    def med(xs):
        return statistics.median(xs)

    total_s = med([r[1] for r in results])
    index_us = med([r[2].index_us for r in results])
    prep_us = med([r[2].nixl_prepare_us for r in results])
    post_us = med([r[2].post_us for r in results])
    other_us = med([r[0] * 1e6 - r[2].index_us - r[2].nixl_prepare_us - r[2].post_us for r in results])
    poll_us = med(polls) * 1e6
    transport_s = med([r[2].post_us * 1e-6 + r[1] - r[0] for r in results])     # post -> seen done
    # plain copies of the same bytes in one process
    src = torch.empty(nbytes, dtype=torch.int8, device=device).random_(-128, 127)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    copy_us = median_us(lambda: (dst.copy_(src), sync()), 5)
    a = kvl.allocate_kv_cache(plan, device)
    b = kvl.allocate_kv_cache(plan, device)
    va, vb = a.group_blocks_view(0).view(torch.int64), b.group_blocks_view(0).view(torch.int64)
    li = torch.tensor(local_ids, device=device)
    ri = torch.tensor(remote_ids, device=device)
    gather_us = median_us(lambda: (va.index_copy_(1, li, vb.index_select(1, ri)), sync()), 5)
    return {
        "layers": layers, "device": device, "bytes": nbytes, "blocks": n, "indices": results[0][2].num_indices,
        "descriptors": results[0][2].num_descriptors, "nixl_descriptors": results[0][2].nixl_descriptors,
        "total_s": total_s, "GBps_total": nbytes / total_s / 1e9,
        "connector_index_us": index_us, "connector_start_other_us": other_us,
        "connector_poll_us": poll_us, "nixl_prepare_us": prep_us, "post_us": post_us,
        "transport_s": transport_s, "GBps_transport": nbytes / transport_s / 1e9,
        "torch_copy_GBps": nbytes / copy_us * 1e-3, "torch_block_gather_GBps": nbytes / gather_us * 1e-3,
    }


def collect(quick: bool, device: str) -> dict:
    """The three parts: 4 layers and fewer repetitions when quick."""
    reps = 50 if quick else 500
    layers = 4 if quick else LAYERS
    return {"model": f"{LAYERS} layers, {HEADS} KV heads, D={HEAD_SIZE}, bf16, block {BLOCK}, {TOKENS}-token request",
            "device": device, "descriptors": descriptor_table(reps),
            "nixl_prepare": nixl_prepare_table(layers, device, reps // 5),
            "transfer": transfer_table(layers, device, 3 if quick else 8)}


def print_report(out: dict) -> None:
    print(f"\n{out['model']}\n\n1. per transfer ({LAYERS} layers; connector's cost = index building)")
    print(f"{'layout':10} {'block ids':28} {'regions':>7} {'indices':>8} {'descriptors':>11} {'index us':>9}")
    for r in out["descriptors"]:
        print(f"{r['layout']:10} {r['blocks']:28} {r['regions']:7d} {r['indices']:8d} {r['descriptors']:11d} "
              f"{r['index_us']:9.1f}")
    t = out["transfer"]
    print(f"\n2. NIXL's prepare per request (make_prepped_xfer; lists prepared once), {t['layers']} layers")
    print(f"{'layout':10} {'block ids':12} {'indices':>8} {'descriptors':>11} {'NIXL us':>9}")
    for r in out["nixl_prepare"]:
        print(f"{r['layout']:10} {r['blocks']:12} {r['indices']:8d} {r['descriptors']:11d} {r['nixl_prepare_us']:9.1f}")
    print(f"\n3. pull of one request through NixlConnector ({t['layers']} layers, {t['bytes'] / 2**20:.0f} MiB, "
          f"{t['blocks']} random blocks, {out['device']}), median")
    print(f"   connector: index {t['connector_index_us']:.0f} us + other start_load work "
          f"{t['connector_start_other_us']:.0f} us + {t['connector_poll_us']:.1f} us per poll")
    print(f"   NIXL prepare {t['nixl_prepare_us']:.0f} us; post {t['post_us']:.0f} us "
          f"({t['descriptors']} descriptors planned, NIXL counted {t['nixl_descriptors']})")
    print(f"   transport (post -> done) {t['transport_s'] * 1e3:.1f} ms = {t['GBps_transport']:.2f} GB/s; "
          f"end to end {t['GBps_total']:.2f} GB/s")
    print(f"   torch copy of the same bytes: contiguous {t['torch_copy_GBps']:.2f} GB/s, "
          f"block gather {t['torch_block_gather_GBps']:.2f} GB/s")


def run(quick: bool, device: str = "cpu") -> list[dict]:
    """``kvlayout bench``'s entry point: the device ceilings, then every number of ``collect`` as rows. The
    transfer rows are payload GB/s against a torch copy of the same bytes in one process (their ceiling);
    index building and NIXL's prepare are host microseconds per request (time only)."""
    rows = [ceilings_row(measure_ceilings(device, quick), device)]
    out = collect(quick, device)
    for r in out["descriptors"]:
        rows.append({"name": f"index building: {r['layout']}, {r['blocks']}", "backend": "kvlayout connector",
                     "seconds": r["index_us"] * 1e-6, "note": f"{LAYERS} layers: {r['regions']} regions, "
                     f"{r['indices']} indices -> {r['descriptors']} descriptors"})
    for r in out["nixl_prepare"]:
        rows.append({"name": f"NIXL prepare: {r['layout']}, {r['blocks']}", "backend": "nixl",
                     "seconds": r["nixl_prepare_us"] * 1e-6,
                     "note": f"{r['layers']} layers: {r['indices']} indices, {r['descriptors']} descriptors"})
    t = out["transfer"]
    name = f"pull {t['bytes'] / 2**20:.0f} MiB ({device})"
    what = f"{t['layers']} layers, {t['blocks']} random blocks"
    ceiling = {"ceiling": t["torch_copy_GBps"], "ceiling_unit": "GB/s", "unit": "GB/s", "bytes": t["bytes"]}
    rows += [
        {"name": name, "backend": "NixlConnector", "seconds": t["total_s"], "achieved": t["GBps_total"], **ceiling,
         "note": f"end to end, {what}; ceiling: torch copy of the same bytes; connector index "
                 f"{t['connector_index_us']:.0f} us + other start_load {t['connector_start_other_us']:.0f} us + "
                 f"{t['connector_poll_us']:.1f} us per poll"},
        {"name": name, "backend": "NIXL transport", "seconds": t["transport_s"], "achieved": t["GBps_transport"],
         **ceiling, "note": f"post -> done, {what}; NIXL prepare {t['nixl_prepare_us']:.0f} us, "
                            f"post {t['post_us']:.0f} us, {t['nixl_descriptors']} descriptors"},
        {"name": name, "backend": "torch gather", "seconds": t["bytes"] / t["torch_block_gather_GBps"] / 1e9,
         "achieved": t["torch_block_gather_GBps"], **ceiling,
         "note": f"index_select + index_copy_ in one process, {what}"},
    ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small transfer (4 layers), fewer repetitions")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--json", help="write every number to this file")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(json.loads(args.serve))
        return
    out = collect(args.quick, args.device)
    print_report(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
