"""Disaggregation across two GPUs of one host: the prefill engine on GPU 0, the decode engine on GPU 1.

    python tools/bench_two_gpu.py [--quick] [--parts demo,tp,transfer,tests] [--json out.json]

1. ``kvlayout demo --device cuda``: the demo's workers take one GPU each (prefill GPU 0, decode GPU 1);
   tokens equal to the single-process run, every hold released.
2. ``kvlayout demo --device cuda --prefill-tp 2 --decode-tp 1``: the prefill engine is TP 2 over both GPUs
   (NCCL), the decode engine TP 1 reads each KV head range from the prefill rank that holds it.
3. Transfers, pull and push, of 1, 8 and 64 requests of 4,096 tokens at once on a 32-layer, 8-KV-head, D=128
   bf16 plan, per-layer caches and cross-layer: a prefill engine in a child process on GPU 0, the decode
   engine's connector here on GPU 1. GB/s next to a torch peer-to-peer copy of the same bytes GPU 0 -> GPU 1
   in the same run; descriptors per transfer; the decode connector's CPU time per request (its calls and
   polls, not the waiting).
4. The GPU tests of the connector and of tensor parallelism (``pytest -m gpu``), on two GPUs.

Every process started keeps NVLink multicast off (``NCCL_NVLS_ENABLE=0`` and the PyTorch / NVSHMEM
equivalents). ``--device cpu`` runs parts 1–3 with CPU memory (a check of the script; no GPU numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _k, _v in NO_MULTICAST.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("KVLAYOUT_CONNECTOR_SECRET", __import__("secrets").token_hex(16))   # children inherit it

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_transfer import BLOCK, TOKENS, _read_ready, model_specs, page_bytes  # noqa: E402

import kvlayout as kvl  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ 1, 2: demo

def demo(device: str, extra: list[str], quick: bool) -> dict:
    """One ``kvlayout demo`` run; its summary (tokens ok, bytes, descriptors, released holds)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo.json"
        cmd = [sys.executable, "-m", "kvlayout", "demo", "--device", device, "--no-progress", "--summary-json",
               str(out), "--requests", "3" if quick else "8"] + extra
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        row = {"part": "demo " + " ".join(extra) if extra else "demo", "rc": proc.returncode,
               "seconds": time.perf_counter() - t0}
        if not out.exists():
            row["error"] = (proc.stderr or proc.stdout)[-400:]
            return row
        s = json.loads(out.read_text())
    recs = s.get("requests", {}).values()
    row.update(ok=s.get("ok"), requests=len(recs), bytes=sum(r.get("bytes", 0) for r in recs),
               descriptors=sum(r.get("descriptors", 0) for r in recs),
               released=sum(bool(r.get("released")) for r in recs), wall_s=s.get("wall_s"))
    return row


# ----------------------------------------------------------------------------------------- 3: transfers

def serve(cfg: dict) -> None:
    """Child: the prefill engine. Pull: holds every request of every round up front and prints the hold
    tokens; push: pushes each grant of a line of grants it reads from stdin."""
    from kvlayout.connectors import NixlConnector
    plan = kvl.plan_kv_cache(model_specs(cfg["layers"]), cfg["num_blocks"] * page_bytes() * cfg["layers"],
                             cross_layer=cfg["cross_layer"])
    caches = kvl.allocate_kv_cache(plan, cfg["device"], zero=False)
    for buf in caches.buffers:
        buf.view(torch.uint8).random_(0, 255)
    conn = NixlConnector(caches, specs=plan.specs, engine_id="two-gpu-prefill", hold_timeout_s=3600)
    ids = cfg["block_ids"]
    tokens = {f"{r}-{i}": conn.hold_blocks(f"{r}-{i}", ids[i])["hold_token"]
              for r in range(cfg["rounds"]) for i in range(len(ids))} if cfg["mode"] == "pull" else {}
    print("@@" + json.dumps({"address": conn.address, "tokens": tokens}), flush=True)
    import select
    while True:
        if select.select([sys.stdin], [], [], 0.0005)[0]:
            line = sys.stdin.readline()
            if not line or line.strip() == "quit":
                break
            for i, grant in enumerate(json.loads(line)):
                conn.start_push(grant["request_id"], grant, ids[i])
        ev = conn.poll()
        if ev.push_failed:
            print(f"push failed: {ev.push_failed}", file=sys.stderr, flush=True)
    conn.close()


def transfer(mode: str, num_requests: int, cross_layer: bool, layers: int, rounds: int, devices) -> dict:
    """``num_requests`` requests of ``TOKENS`` tokens moved at once, ``rounds`` times after a first that
    includes the handshake; the medians."""
    from kvlayout.connectors import NixlConnector
    n = TOKENS // BLOCK
    num_blocks = num_requests * n + 16
    rng = np.random.default_rng(3)
    remote = rng.permutation(num_blocks)[:num_requests * n].reshape(num_requests, n).tolist()
    local = rng.permutation(num_blocks)[:num_requests * n].reshape(num_requests, n).tolist()
    child = subprocess.Popen([sys.executable, __file__, "--serve", json.dumps(
        {"layers": layers, "num_blocks": num_blocks, "device": devices[0], "cross_layer": cross_layer,
         "mode": mode, "rounds": rounds + 1, "block_ids": remote})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = _read_ready(child)
        plan = kvl.plan_kv_cache(model_specs(layers), num_blocks * page_bytes() * layers, cross_layer=cross_layer)
        conn = NixlConnector(kvl.allocate_kv_cache(plan, devices[1]), specs=plan.specs, engine_id="two-gpu-decode",
                             telemetry=True)
        walls, cpu, descs = [], [], []
        for r in range(rounds + 1):
            rids = [f"{r}-{i}" for i in range(num_requests)]
            t0 = time.perf_counter()
            if mode == "pull":
                for i, rid in enumerate(rids):
                    conn.start_load(rid, ready["address"], remote[i], local[i], hold_token=ready["tokens"][rid])
            else:
                grants = [conn.grant_blocks(rid, local[i], ready["address"]) for i, rid in enumerate(rids)]
                child.stdin.write(json.dumps(grants) + "\n")
                child.stdin.flush()
            busy = time.perf_counter() - t0
            left = set(rids)
            while left:
                tp = time.perf_counter()
                ev = conn.poll()
                busy += time.perf_counter() - tp
                if ev.failed:
                    raise RuntimeError(f"{mode} failed: {ev.failed}")
                left -= set(ev.finished)
            if r:                                            # round 0 includes the handshake
                walls.append(time.perf_counter() - t0)
                cpu.append(busy / num_requests)
                if mode == "pull":
                    descs.append(sum(conn.transfer_info(rid).num_descriptors for rid in rids) / num_requests)
        conn.close()
        child.stdin.write("quit\n")
        child.stdin.flush()
    finally:
        if not child.stdin.closed:
            child.stdin.close()
        child.wait(60)
    nbytes = num_requests * layers * n * page_bytes()
    wall = float(np.median(walls))
    return {"part": "transfer", "mode": mode, "requests": num_requests, "layout": "cross-layer" if cross_layer
            else "per-layer", "bytes": nbytes, "seconds": wall, "GBps": nbytes / wall / 1e9,
            "descriptors_per_request": float(np.median(descs)) if descs else None,
            "connector_cpu_us_per_request": float(np.median(cpu)) * 1e6}


def p2p_copy_GBps(nbytes: int, devices) -> float:
    """A torch copy of ``nbytes`` from the first device to the second (peer to peer between GPUs)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=devices[0]).random_(0, 255)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=devices[1])
    sync = (lambda: [torch.cuda.synchronize(d) for d in devices]) if "cuda" in devices[0] else (lambda: None)
    times = []
    for _ in range(6):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    return nbytes / float(np.median(times[1:])) / 1e9


# ---------------------------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, 1 and 8 requests, 2 rounds")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--parts", default="demo,tp,transfer,tests")
    ap.add_argument("--sizes", default=None, help="requests per transfer (default 1,8,64; --quick 1,8)")
    ap.add_argument("--layouts", default="per-layer,cross-layer")
    ap.add_argument("--json")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(json.loads(args.serve))
        return 0
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print(f"bench_two_gpu skipped: it needs two GPUs, this machine has {torch.cuda.device_count()}")
        return 0
    devices = ("cuda:0", "cuda:1") if args.device == "cuda" else ("cpu", "cpu")
    parts = args.parts.split(",")
    rows = []
    if "demo" in parts:
        rows.append(demo(args.device, [], args.quick))
    if "tp" in parts:
        rows.append(demo(args.device, ["--prefill-tp", "2", "--decode-tp", "1"], args.quick))
    if "transfer" in parts:
        layers = 4 if args.quick else 32
        sizes = [int(k) for k in (args.sizes or ("1,8" if args.quick else "1,8,64")).split(",")]
        for cross in [lay == "cross-layer" for lay in args.layouts.split(",")]:
            for mode in ("pull", "push"):
                for k in sizes:
                    rows.append(transfer(mode, k, cross, layers, 2 if args.quick else 5, devices))
        biggest = max(r["bytes"] for r in rows if r["part"] == "transfer")
        rows.append({"part": "torch copy", "mode": f"{devices[0]} -> {devices[1]}", "bytes": biggest,
                     "GBps": p2p_copy_GBps(biggest, devices),
                     "peer_access": bool(args.device == "cuda" and torch.cuda.can_device_access_peer(0, 1))})
    if "tests" in parts and args.device == "cuda":
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(REPO / "tests/test_nixl_connector.py"),
                               str(REPO / "tests/test_tensor_parallel.py")], capture_output=True, text=True,
                              timeout=900, cwd=tempfile.gettempdir())
        rows.append({"part": "pytest -m gpu (connector, tensor parallel)", "rc": proc.returncode,
                     "summary": proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]})
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"{name} x {2 if args.device == 'cuda' else 1}: prefill on {devices[0]}, decode on {devices[1]}")
    for r in rows:
        if r["part"] == "transfer":
            d = r["descriptors_per_request"]
            print(f"  {r['mode']:<5} {r['layout']:<11} {r['requests']:>3} x {TOKENS} tokens: {r['GBps']:8.2f} GB/s "
                  f"({r['bytes'] / 2**20:,.0f} MiB in {r['seconds'] * 1e3:.1f} ms), descriptors/request "
                  f"{'-' if d is None else f'{d:.0f}'}, connector CPU {r['connector_cpu_us_per_request']:.0f} us/request")
        elif r["part"] == "torch copy":
            print(f"  torch copy {r['mode']}: {r['GBps']:.2f} GB/s ({r['bytes'] / 2**20:,.0f} MiB; peer access "
                  f"{r['peer_access']})")
        else:
            print(f"  {r['part']}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "part"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r.get("rc", 0) == 0 and r.get("ok", True) is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
