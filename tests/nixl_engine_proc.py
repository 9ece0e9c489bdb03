"""A tiny engine for the NIXL connector tests: one process, one small hybrid cache, one NixlConnector.

Run as ``python nixl_engine_proc.py '<json config>'``; it prints ``@@{"address": ...}`` when ready, then
answers JSON commands (one per stdin line) with ``@@<json>`` lines while polling its connector between
commands. Also imported by the tests for ``build_cache`` (the same cache contents from the same seed).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
import select
import sys
import time

import numpy as np
import torch

import kvlayout as kvl

STATES = {"conv": ((32, 3), torch.float16), "ssm": ((2, 8, 16), torch.float32)}   # 1,216 B per page


def model_specs(num_kv_heads: int, dtype=torch.float16, block_size: int = 16) -> dict:
    """Two attention and two Mamba layers (as written by a model; ``build_cache`` pads the Mamba pages)."""
    return {
        "l0.attn": kvl.AttentionSpec(num_kv_heads, 16, dtype, block_size),
        "l1.mamba": kvl.MambaSpec(STATES),
        "l2.attn": kvl.AttentionSpec(num_kv_heads, 16, dtype, block_size),
        "l3.mamba": kvl.MambaSpec(STATES),
    }


@dataclass(frozen=True)
class OneGroupPlan:
    """What the connector tests need of a plan: the specs and the layout."""

    specs: dict
    layout: kvl.KVCacheLayout


def build_cache(num_kv_heads: int = 4, num_blocks: int = 256, seed: int = 0, device: str = "cpu",
                dtype=torch.float16, block_size: int = 16, cross_layer: bool = False):
    """``(plan, caches)`` with every byte of every buffer drawn from ``seed``.

    The layout is one group of all four layers sharing block ids (each Mamba page padded to the attention
    page), made by the resolver itself: the connector must serve any layout the resolver makes, and this
    one lets a block id name a block of every layer. (``plan_kv_cache`` puts a hybrid model on a page pool
    instead, where attention and state ids differ: tests/test_connector_pool.py.)"""
    specs = model_specs(num_kv_heads, dtype, block_size)
    page = specs["l0.attn"].page_size_bytes
    specs = {n: (s.padded_to(page) if isinstance(s, kvl.MambaSpec) else s) for n, s in specs.items()}
    layout = kvl.resolve_kv_cache_layout(specs, num_blocks, cross_layer=cross_layer or None)
    plan = OneGroupPlan(specs, layout)
    caches = kvl.allocate_kv_cache(layout, device)
    gen = torch.Generator().manual_seed(seed)
    for buf in caches.buffers:
        buf.copy_(torch.randint(-128, 128, buf.shape, dtype=torch.int8, generator=gen))
    return plan, caches


def _reply(obj) -> None:
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    from kvlayout.connectors import NixlConnector

    plan, caches = build_cache(cfg.get("heads", 4), cfg.get("num_blocks", 256), cfg.get("seed", 0))
    conn = NixlConnector(caches, specs=plan.specs, engine_id=cfg["engine_id"], tp_rank=cfg.get("tp_rank", 0),
                         tp_size=cfg.get("tp_size", 1), load_timeout_s=cfg.get("load_timeout_s", 20.0),
                         hold_timeout_s=cfg.get("hold_timeout_s", 60.0), handshake_timeout_s=2.0)
    finished, failed, released = set(), {}, {}

    def poll():
        ev = conn.poll()
        finished.update(ev.finished)
        failed.update(ev.failed)
        released.update({r.request_id: [r.reason, r.ok] for r in ev.released})

    _reply({"address": conn.address, "pid": os.getpid()})
    fd, pending = sys.stdin.fileno(), b""
    while True:
        ready, _, _ = select.select([fd], [], [], 0.002)
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break                                   # the test process went away
            pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            cmd = json.loads(line)
            op = cmd["cmd"]
            try:
                if op == "hold":
                    tokens = {}
                    for rid, ids in cmd["holds"]:
                        tokens[rid] = conn.hold_blocks(rid, ids, num_readers=cmd.get("num_readers", 1),
                                                       timeout_s=cmd.get("timeout_s"))["hold_token"]
                    _reply({"ok": True, "tokens": tokens})
                elif op == "load":
                    for rid, engines, rids, lids, tokens in cmd["loads"]:
                        conn.start_load(rid, engines, rids, lids, hold_token=tokens)
                    _reply({"ok": True})
                elif op == "wait":
                    want, deadline = set(cmd["request_ids"]), time.monotonic() + cmd["timeout_s"]
                    key = cmd["what"]
                    while time.monotonic() < deadline:
                        poll()
                        seen = (finished | set(failed)) if key == "loads" else set(released)
                        if want <= seen:
                            break
                        time.sleep(0.002)
                    _reply({"finished": sorted(finished & want), "failed": {k: failed[k] for k in want if k in failed},
                            "released": {k: released[k] for k in want if k in released}})
                elif op == "dump":
                    for i, buf in enumerate(caches.buffers):
                        np.save(f"{cmd['path']}_{i}.npy", buf.cpu().numpy(), allow_pickle=False)
                    _reply({"ok": True})
                elif op == "stats":
                    _reply(conn.stats)
                elif op == "exit":
                    conn.close()
                    _reply({"ok": True})
                    return
                else:
                    _reply({"error": f"unknown command {op!r}"})
            except Exception as exc:                    # report, keep serving
                _reply({"error": f"{type(exc).__name__}: {exc}"})
        poll()


if __name__ == "__main__":
    main()
