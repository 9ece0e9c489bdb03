"""``kvlayout demo``: prefill/decode disaggregation end to end on one machine.

A prefill engine and a decode engine run as two processes (``kvlayout.cli.demo_worker``) on 127.0.0.1, each
with the same model (a shipped tiny config with seeded random weights, or any Llama-style config) and its
own paged cache. Every request is prefilled on one, its blocks are pulled by the other through the NIXL
connector, and decoded there. The tokens are checked against a single-process run of the same requests.
Prints the layout plan, per-phase timings, transfer bytes and descriptor counts.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..connectors.nixl_api import nixl_installed
from ..errors import KVLayoutError
from ..engine.runner import Engine
from ..engine.tensor_parallel import total_kv_heads
from ..tp import kv_head_range, query_head_range
from .demo_worker import engine_threads
from ..specs import parse_dtype

DEFAULT_MODEL = "tiny-llama"
# NCCL, PyTorch and NVSHMEM leave NVLink multicast alone with these (a shared host's GPUs can hang otherwise)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
NIXL_HINT = 'NIXL is not installed; install it with  pip install "kvlayout[nixl]"  to run the two-engine part.'


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    return [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in lens]


def _engine_cfg(args, role: str) -> dict:
    # The worker runs in a neutral folder (see Worker), so a model given as a relative path is made absolute.
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    mine, peer = (args.prefill_tp, args.decode_tp) if role == "prefill" else (args.decode_tp, args.prefill_tp)
    return {"role": role, "tp_size": mine, "peer_tp": peer, "num_processes": args.prefill_tp + args.decode_tp,
            "model": model, "seed": args.seed, "backend": args.backend, "device": args.device,
            "dtype": args.dtype, "block_size": args.block_size, "num_blocks": args.num_blocks,
            "max_num_batched_tokens": args.token_budget, "cross_layer": args.cross_layer or None,
            "scramble_seed": (args.seed + 1) if (args.scramble and role == "decode") else None,
            "load_timeout_s": args.timeout}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """One engine process (rank ``rank`` of its fleet of ``cfg["tp_size"]``, in the ``torchrun``
    environment): JSON lines in, ``@@``-prefixed JSON lines out (read on a thread)."""

    def __init__(self, cfg: dict, rank: int, master_port: int, events: queue.Queue, slot: int = 0):
        self.role = cfg["role"]
        self.name = self.role if cfg["tp_size"] == 1 else f"{self.role} rank {rank}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"kvlayout-demo-{self.role}{rank}-", suffix=".log",
                                               delete=False)
        env = dict(os.environ)
        env.setdefault("UCX_NET_DEVICES", "lo")
        for key in NO_MULTICAST:                   # NVLink multicast stays off in every process we start
            env.setdefault(key, NO_MULTICAST[key])
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(cfg["tp_size"]),
                   LOCAL_WORLD_SIZE=str(cfg["tp_size"]), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
        if cfg["device"] == "cuda" and "CUDA_VISIBLE_DEVICES" not in os.environ:
            gpus = list(range(torch.cuda.device_count()))
            env["CUDA_VISIBLE_DEVICES"] = str(gpus[slot % len(gpus)]) if gpus else ""
            env["LOCAL_RANK"] = "0"
        self.rank = rank
        self.proc = subprocess.Popen([sys.executable, "-m", "kvlayout.cli.demo_worker", json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=tempfile.gettempdir())
        # cwd: run from a neutral folder, so that ``-m kvlayout...`` cannot pick up a ``kvlayout`` folder
        # (e.g. a checkout) in the caller's current directory as a namespace package.
        threading.Thread(target=self._read, args=(events,), daemon=True).start()

    def _read(self, events: queue.Queue) -> None:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                events.put((self, json.loads(line[2:])))
        events.put((self, {"event": "exited", "code": self.proc.wait()}))

    def send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def log_tail(self, n: int = 15) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "exit"})
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def run_single(args, prompts, console: Console) -> tuple[list[list[int]], float, Engine]:
    eng = Engine(args.model, seed=args.seed, backend=args.backend, device=args.device,
                 dtype=parse_dtype(args.dtype), block_size=args.block_size, num_blocks=args.num_blocks,
                 max_num_batched_tokens=args.token_budget, cross_layer=args.cross_layer or None)
    rids = [eng.add_request(p, args.new_tokens) for p in prompts]
    total = sum(len(p) for p in prompts) + len(prompts) * (args.new_tokens - 1)
    threads = torch.get_num_threads()
    if args.device == "cpu":
        torch.set_num_threads(engine_threads())          # as many threads as one engine process gets
    try:
        t0 = time.perf_counter()
        with _progress(console, args) as bar:
            task = bar.add_task("single process", total=total)
            eng.run(lambda r: bar.advance(task, r.num_tokens))
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return [eng.requests[r].output for r in rids], seconds, eng


def _progress(console: Console, args) -> Progress:
    return Progress(TextColumn("{task.description:>16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=args.no_progress)


def run_disaggregated(args, prompts, console: Console) -> dict:
    """Prefill on one fleet of processes (``--prefill-tp`` ranks), NIXL pull, decode on another
    (``--decode-tp`` ranks); each decode rank pulls its KV heads from the prefill ranks that hold them.
    Returns per-request records and totals."""
    events: queue.Queue = queue.Queue()
    fleets: dict[str, list[Worker]] = {}
    slot = 0
    for role in ("prefill", "decode"):
        cfg, port = _engine_cfg(args, role), _free_port()
        gpus = torch.cuda.device_count() if args.device == "cuda" else 0
        # NCCL wants one GPU per rank; ranks that share a GPU (or the CPU) talk over gloo
        cfg["dist_backend"] = "nccl" if gpus >= cfg["tp_size"] > 1 else "gloo"
        fleets[role] = []
        for rank in range(cfg["tp_size"]):
            fleets[role].append(Worker(cfg, rank, port, events, slot))
            slot += 1
    num_workers = slot
    recs = {f"r{i}": {"prompt_len": len(p), "holds": {}, "pulls": {}, "released_by": {}} for i, p in enumerate(prompts)}
    ready: dict[tuple[str, int], dict] = {}
    deadline = time.monotonic() + args.timeout
    t0 = None
    wall = None
    ptp, dtp = len(fleets["prefill"]), len(fleets["decode"])

    def released(r: dict) -> bool:
        return len(r["released_by"]) == ptp

    try:
        with _progress(console, args) as bar:
            tasks = {k: bar.add_task(k, total=len(prompts)) for k in ("prefill", "transfer", "decode")}
            done = 0
            while done < len(prompts) or not all(released(r) for r in recs.values()):
                if done == len(prompts) and wall is None:
                    wall = time.perf_counter() - t0
                try:
                    worker, ev = events.get(timeout=max(deadline - time.monotonic(), 0.01))
                except queue.Empty:
                    if done == len(prompts):
                        break                            # the tokens are in; report the unreleased holds
                    raise KVLayoutError(f"the demo did not finish within {args.timeout:g} s") from None
                kind = ev["event"]
                if kind in ("error", "exited"):
                    raise KVLayoutError(f"the {worker.name} engine stopped ({ev.get('reason', 'exit code %s' % ev.get('code'))}); "
                                        f"its log ends with:\n{worker.log_tail()}")
                if kind == "ready":
                    ready[(worker.role, worker.rank)] = ev
                    if len(ready) == num_workers:
                        t0 = time.perf_counter()
                        for i, p in enumerate(prompts):
                            fleets["prefill"][0].send({"cmd": "prefill", "id": f"r{i}", "prompt": p})
                elif kind == "prefilled":
                    rid = ev["id"]
                    r = recs[rid]
                    r["holds"][worker.rank] = ev["params"]
                    if ev["params"] is None:             # this rank's heads are replicas another rank serves
                        r["released_by"][worker.rank] = True
                    if worker.rank == 0:
                        r.update(prefill_s=ev["seconds"], blocks=ev["blocks"], first_token=ev["first_token"])
                    if len(r["holds"]) == ptp:
                        fleets["decode"][0].send({"cmd": "load", "id": rid, "prompt": prompts[int(rid[1:])],
                                                  "first_token": r["first_token"], "max_new_tokens": args.new_tokens,
                                                  "params": [r["holds"][k] for k in range(ptp)]})
                        bar.advance(tasks["prefill"])
                elif kind == "transferred":
                    r = recs[ev["id"]]
                    r["pulls"][worker.rank] = {k: ev[k] for k in ("seconds", "bytes", "indices", "descriptors",
                                                                  "index_us", "nixl_prepare_us", "post_us", "sources")}
                    if len(r["pulls"]) == dtp:
                        pulls = r["pulls"].values()
                        r.update({k: sum(p[k] for p in pulls) for k in ("bytes", "indices", "descriptors",
                                                                        "index_us", "nixl_prepare_us", "post_us")})
                        r["transfer_s"] = max(p["seconds"] for p in pulls)
                        bar.advance(tasks["transfer"])
                elif kind == "failed":
                    raise KVLayoutError(f"transfer of {ev['id']} failed: {ev['reason']}")
                elif kind == "released":
                    recs[ev["id"]]["released_by"][worker.rank] = ev["ok"]
                elif kind == "done":
                    recs[ev["id"]].update(decode_s=ev["seconds"], tokens=ev["tokens"])
                    bar.advance(tasks["decode"])
                    done += 1
        if wall is None:
            wall = time.perf_counter() - t0
        for r in recs.values():                          # every rank's hold was read (or was no hold)
            r["released"] = released(r) and all(r["released_by"].values())
            r["holding_ranks"] = sorted(k for k, h in r.pop("holds").items() if h is not None)   # tokens stay here
    finally:
        for fleet in fleets.values():
            for w in fleet:                              # rank 0 first: it tells the other ranks to stop
                w.stop()
    return {"requests": recs, "wall_s": wall, "prefill_tp": ptp, "decode_tp": dtp,
            "plans": {role: ready[(role, 0)]["plan"] for role in fleets},
            "page_bytes": ready[("prefill", 0)]["page_bytes"]}


def _ms(s: Optional[float]) -> str:
    return "-" if s is None else f"{1e3 * s:.1f}"


def report(console: Console, prompts, ref, single_s, dis: dict) -> bool:
    tp = f" (prefill TP {dis['prefill_tp']}, decode TP {dis['decode_tp']}; bytes and descriptors summed " \
         f"over the decode ranks)" if dis["prefill_tp"] * dis["decode_tp"] > 1 else ""
    table = Table(title=f"requests: prefill engine -> NIXL pull -> decode engine{tp}", title_justify="left")
    for col in ("id", "prompt", "blocks", "prefill ms", "pull ms", "bytes", "descriptors", "prep us",
                "decode ms", "tokens"):
        table.add_column(col, justify="left" if col in ("id", "tokens") else "right")
    ok_all = True
    for i, p in enumerate(prompts):
        r = dis["requests"][f"r{i}"]
        ok = r.get("tokens") == ref[i]
        ok_all &= ok
        table.add_row(f"r{i}", str(len(p)), str(r.get("blocks", "-")), _ms(r.get("prefill_s")),
                      _ms(r.get("transfer_s")), f"{r.get('bytes', 0):,}", str(r.get("descriptors", "-")),
                      f"{r.get('index_us', 0) + r.get('nixl_prepare_us', 0):.0f}", _ms(r.get("decode_s")),
                      "match" if ok else "MISMATCH")
    console.print(table)
    recs = dis["requests"].values()
    nbytes = sum(r.get("bytes", 0) for r in recs)
    xfer = sum(r.get("transfer_s", 0) for r in recs)
    console.print(f"pulled {nbytes:,} B in {sum(r.get('descriptors', 0) for r in recs)} descriptors "
                  f"({sum(r.get('indices', 0) for r in recs)} (region, block) indices before coalescing); "
                  f"pull ms = start_load to the decode engine seeing it done (its steps in between included), "
                  f"sum {_ms(xfer)} ms; prep us = the connector's index building + NIXL's prepare")
    console.print(f"wall time: disaggregated {_ms(dis['wall_s'])} ms, single process {_ms(single_s)} ms; "
                  f"prefill blocks released after the read: "
                  f"{sum(bool(r.get('released')) for r in recs)}/{len(prompts)}")
    console.print(("tokens match the single-process run for all requests" if ok_all else
                   "TOKENS DIFFER from the single-process run"), style="bold green" if ok_all else "bold red")
    return ok_all


def run(args) -> int:
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=120)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise KVLayoutError("--device cuda was asked for but no CUDA device is visible")
    if args.requests < 1 or not 1 <= args.min_prompt <= args.max_prompt or args.new_tokens < 2:
        raise KVLayoutError("need --requests >= 1, 1 <= --min-prompt <= --max-prompt and --new-tokens >= 2 "
                            "(the first token comes from the prefill engine, the rest from the decode engine)")
    if args.prefill_tp < 1 or args.decode_tp < 1:
        raise KVLayoutError("--prefill-tp and --decode-tp must be >= 1")
    if args.backend is None:
        args.backend = "torch" if args.device == "cpu" else "auto"   # auto: the first that serves the model
    from ..engine.hf_model import hf_model_config
    model_cfg = hf_model_config(args.model)
    vocab = int(model_cfg.vocab_size)
    for size in {args.prefill_tp, args.decode_tp}:        # refuse a TP size the heads do not split over, now
        query_head_range(0, size, int(model_cfg.num_attention_heads))
        kv_head_range(0, size, total_kv_heads(model_cfg))
    prompts = make_prompts(args.requests, args.min_prompt, args.max_prompt, vocab, args.seed)
    console.print(f"kvlayout demo: model {args.model}, {args.requests} requests (prompts {args.min_prompt}-"
                  f"{args.max_prompt} tokens, {args.new_tokens} new), backend {args.backend}, device "
                  f"{args.device}, {args.dtype}, token budget {args.token_budget}/step"
                  + (f", prefill TP {args.prefill_tp}, decode TP {args.decode_tp}"
                     if args.prefill_tp * args.decode_tp > 1 else ""))
    ref, single_s, eng = run_single(args, prompts, console)
    args.backend = eng.backend.name                  # both engines run what "auto" chose here
    console.print(f"attention backend: {args.backend}")
    console.print(eng.plan.describe())
    summary = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "reference_tokens": ref,
               "single_s": single_s}
    if not nixl_installed():
        console.print(f"single-process run: {len(prompts)} requests in {_ms(single_s)} ms")
        console.print(NIXL_HINT, style="yellow", markup=False)
        summary["nixl"] = False
        _write_summary(args, summary)
        return 0
    dis = run_disaggregated(args, prompts, console)
    if dis["plans"].get("decode") != dis["plans"].get("prefill"):
        console.print("decode engine plan:\n" + dis["plans"]["decode"])
    ok = report(console, prompts, ref, single_s, dis)
    summary.update(nixl=True, ok=ok, **dis)
    _write_summary(args, summary)
    return 0 if ok else 1


def _write_summary(args, summary: dict) -> None:
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="prefill and decode engines in two processes, blocks moved by NIXL",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--model", default=DEFAULT_MODEL, help="shipped config name or config.json (random seeded weights)")
    p.add_argument("--requests", type=int, default=6, help="number of requests (default 6)")
    p.add_argument("--min-prompt", type=int, default=8)
    p.add_argument("--max-prompt", type=int, default=80)
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per request (default 16)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--backend", default=None, help="attention backend (default: torch on cpu, auto on cuda)")
    p.add_argument("--dtype", default="fp32", help="model and cache dtype (default fp32)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=256, help="cache blocks per engine (default 256)")
    p.add_argument("--token-budget", type=int, default=64, help="tokens per engine step (chunked prefill)")
    p.add_argument("--cross-layer", action="store_true", help="one allocation per group: one descriptor per block")
    p.add_argument("--prefill-tp", type=int, default=1, help="tensor-parallel ranks of the prefill engine (default 1)")
    p.add_argument("--decode-tp", type=int, default=1, help="tensor-parallel ranks of the decode engine (default 1)")
    p.add_argument("--scramble", action="store_true", help="the decode engine hands out blocks in random order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before the demo gives up")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--summary-json", default=None, help="also write the results as JSON to this file")
    p.set_defaults(func=run)
