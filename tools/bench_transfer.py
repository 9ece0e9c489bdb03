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
os.environ.setdefault("KVLAYOUT_CONNECTOR_SECRET", __import__("secrets").token_hex(16))   # child inherits it

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
    """Child process: a prefill engine. Pull: holds ``cfg['requests']`` requests on the same blocks up front.
    Push: pushes each grant it reads from stdin (one JSON line each). Reports its own connector CPU time."""
    from kvlayout.connectors import NixlConnector
    plan = kvl.plan_kv_cache(model_specs(cfg["layers"]), cfg["num_blocks"] * page_bytes() * cfg["layers"])
    caches = kvl.allocate_kv_cache(plan, cfg["device"], zero=False)
    gen = torch.Generator().manual_seed(5)
    for buf in caches.buffers:                                   # real bytes, resident pages
        buf.copy_(torch.randint(-128, 128, buf.shape, dtype=torch.int8, generator=gen))
    conn = NixlConnector(caches, specs=plan.specs, engine_id="bench-prefill", hold_timeout_s=3600,
                         digests=cfg["digests"])
    tokens, call_us = {}, []
    if cfg["mode"] == "pull":
        for i in range(cfg["requests"]):
            t0 = time.perf_counter()
            tokens[f"r{i}"] = conn.hold_blocks(f"r{i}", cfg["block_ids"])["hold_token"]
            call_us.append((time.perf_counter() - t0) * 1e6)
    print("@@" + json.dumps({"address": conn.address, "tokens": tokens}), flush=True)
    import select
    while True:
        if select.select([sys.stdin], [], [], 0.0005)[0]:
            line = sys.stdin.readline()
            if not line or line.strip() == "quit":
                break
            grant = json.loads(line)
            t0 = time.perf_counter()
            conn.start_push(grant["request_id"], grant, cfg["block_ids"])
            call_us.append((time.perf_counter() - t0) * 1e6)
        t0 = time.perf_counter()
        ev = conn.poll()
        if ev.push_failed:
            print(f"push failed: {ev.push_failed}", file=sys.stderr, flush=True)
        if ev.pushed or ev.push_failed or ev.released:
            call_us.append((time.perf_counter() - t0) * 1e6)      # the poll that launched / finished work
    print("@@" + json.dumps({"prefill_call_us": statistics.median(call_us[1:] or call_us or [0.0])}), flush=True)
    print(f"prefill connector stats: {conn.stats}", file=sys.stderr, flush=True)
    conn.close()


def _read_ready(child) -> dict:
    line = ""
    while not line.startswith("@@"):
        line = child.stdout.readline()
        if not line:
            raise RuntimeError("the prefill child exited before it answered")
    return json.loads(line[2:])


def transfer_table(layers: int, device: str, iters: int, mode: str = "pull", digests: bool = False) -> dict:
    """One request of ``TOKENS`` tokens moved ``iters`` times (after one that includes the handshake)."""
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
         "block_ids": remote_ids, "mode": mode, "digests": digests})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = _read_ready(child)
        address, tokens = ready["address"], ready["tokens"]
        caches = kvl.allocate_kv_cache(plan, device)
        conn = NixlConnector(caches, specs=plan.specs, engine_id="bench-decode", telemetry=True, digests=digests)
        results, polls = [], []
        for i in range(iters + 1):                               # the first one includes the handshake
            rid = f"r{i}"
            t0 = time.perf_counter()
            if mode == "pull":
                conn.start_load(rid, address, remote_ids, local_ids, hold_token=tokens[rid])
            else:
                grant = conn.grant_blocks(rid, local_ids, address)
            t1 = time.perf_counter()
            if mode == "push":
                child.stdin.write(json.dumps(grant) + "\n")
                child.stdin.flush()
            while True:
                tp = time.perf_counter()
                ev = conn.poll()
                polls.append(time.perf_counter() - tp)
                if ev.failed:
                    raise RuntimeError(f"{mode} failed: {ev.failed}")
                if rid in ev.finished:
                    break
            t2 = time.perf_counter()
            if i:
                results.append((t1 - t0, t2 - t0, conn.transfer_info(rid) if mode == "pull" else None))
        conn.close()
        child.stdin.write("quit\n")
        child.stdin.flush()
        prefill_us = _read_ready(child)["prefill_call_us"]
    finally:
        if not child.stdin.closed:
            child.stdin.close()
        child.wait(30)

    def med(xs):
        return statistics.median(xs)

    nbytes = layers * n * page_bytes()
    total_s = med([r[1] for r in results])
    pulled = mode == "pull"
    out = {"layers": layers, "device": device, "mode": mode, "digests": digests, "bytes": nbytes, "blocks": n,
           "total_s": total_s, "GBps_total": nbytes / total_s / 1e9, "connector_start_us": med([r[0] for r in results]) * 1e6,
           "connector_poll_us": med(polls) * 1e6, "prefill_call_us": prefill_us}
    if pulled:
        info = results[0][2]
        transport_s = med([r[2].post_us * 1e-6 + r[1] - r[0] for r in results])     # post -> seen done
        out.update(indices=info.num_indices, descriptors=info.num_descriptors, nixl_descriptors=info.nixl_descriptors,
                   connector_index_us=med([r[2].index_us for r in results]),
                   nixl_prepare_us=med([r[2].nixl_prepare_us for r in results]),
                   post_us=med([r[2].post_us for r in results]), transport_s=transport_s,
                   connector_start_other_us=med([r[0] * 1e6 - r[2].index_us - r[2].nixl_prepare_us - r[2].post_us
                                                 for r in results]),
                   GBps_transport=nbytes / transport_s / 1e9)
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
    out.update(torch_copy_GBps=nbytes / copy_us * 1e-3, torch_block_gather_GBps=nbytes / gather_us * 1e-3)
    return out


def digest_table(layers: int, device: str) -> dict:
    """The digests of one request (``TOKENS`` tokens, every layer): what ``hold_blocks`` and the decode side
    each add with ``digests=True``. GB/s of cache bytes digested, next to a device copy of the same bytes."""
    from kvlayout.connectors.digests import Digester, digest_groups
    from kvlayout.connectors.record import build_record
    n = TOKENS // BLOCK
    plan = kvl.plan_kv_cache(model_specs(layers), 2 * n * page_bytes() * layers)
    caches = kvl.allocate_kv_cache(plan, device)
    rec = build_record(caches, engine_id="bench", agent_name="bench", specs=plan.specs)
    dig = Digester(caches, layer_regions(caches), rec)
    groups = digest_groups(rec)
    ids = np.random.default_rng(3).permutation(plan.groups[0].num_blocks)[:n]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    us = median_us(lambda: ([dig.combined(g.layers, ids) for g in groups], sync()), 5)
    nbytes = layers * n * page_bytes()
    src = torch.empty(nbytes, dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    copy_us = median_us(lambda: (dst.copy_(src), sync()), 5)
    return {"layers": layers, "bytes": nbytes, "us": us, "GBps": nbytes / us * 1e-3,
            "copy_GBps": 2 * nbytes / copy_us * 1e-3}


# (mode, digests) moved next to the plain pull; quick runs push and digests once each (each is a child process)
MODES = [("push", False), ("push", True), ("pull", True)]
QUICK_MODES = [("push", False), ("pull", True)]


def collect(quick: bool, device: str) -> dict:
    """The three parts: 4 layers, fewer repetitions and modes when quick."""
    reps = 50 if quick else 500
    layers = 4 if quick else LAYERS
    return {"model": f"{LAYERS} layers, {HEADS} KV heads, D={HEAD_SIZE}, bf16, block {BLOCK}, {TOKENS}-token request",
            "device": device, "descriptors": descriptor_table(reps),
            "nixl_prepare": nixl_prepare_table(layers, device, reps // 5),
            "digests": digest_table(layers, device),
            "transfer": transfer_table(layers, device, 3 if quick else 8),
            "modes": [transfer_table(layers, device, 3 if quick else 8, mode, dig)
                      for mode, dig in (QUICK_MODES if quick else MODES)]}


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
    g = out["digests"]
    print(f"\n5. digests of one request ({g['layers']} layers, {g['bytes'] / 2**20:.0f} MiB): {g['us']:.0f} us = "
          f"{g['GBps']:.1f} GB/s read (device copy of the same bytes: {g['copy_GBps']:.1f} GB/s read + written)")
    print(f"\n4. pull and push, without and with digests (same request; medians; prefill = its connector's CPU per call)")
    print(f"{'mode':5} {'digests':7} {'GB/s':>7} {'ms':>8} {'decode start us':>15} {'poll us':>8} {'prefill us':>10}")
    for m in [t] + out["modes"]:
        print(f"{m['mode']:5} {str(m['digests']):7} {m['GBps_total']:7.2f} {m['total_s'] * 1e3:8.2f} "
              f"{m['connector_start_us']:15.0f} {m['connector_poll_us']:8.1f} {m['prefill_call_us']:10.0f}")


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
        *[{"name": f"{m['mode']} {t['bytes'] / 2**20:.0f} MiB ({device})" + (", digests" if m["digests"] else ""),
           "backend": "NixlConnector", "seconds": m["total_s"], "achieved": m["GBps_total"], **ceiling,
           "note": f"end to end; decode start {m['connector_start_us']:.0f} us, prefill connector "
                   f"{m['prefill_call_us']:.0f} us per call"} for m in out["modes"]],
        {"name": name, "backend": "torch gather", "seconds": t["bytes"] / t["torch_block_gather_GBps"] / 1e9,
         "achieved": t["torch_block_gather_GBps"], **ceiling,
         "note": f"index_select + index_copy_ in one process, {what}"},
    ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small transfer (4 layers), fewer repetitions")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
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
