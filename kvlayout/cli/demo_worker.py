"""One engine of ``kvlayout demo``: a prefill or a decode engine in its own process, with a NIXL connector.

Run as ``python -m kvlayout.cli.demo_worker '<json config>'``. It answers on stdout with lines ``@@<json>``
(first ``ready``, with its connector address and plan) and takes JSON commands one per stdin line:

- prefill role: ``{"cmd": "prefill", "id", "prompt"}`` -> computes the prompt (chunked, batched with the
  others), samples the first token, holds the blocks for the decode engine and replies ``prefilled``
  (first token, hold parameters, seconds); ``released`` when the decode engine has read them.
- decode role: ``{"cmd": "load", "id", "prompt", "first_token", "max_new_tokens", "params"}`` -> allocates
  blocks, pulls the remote blocks into them (``transferred``, with the connector's costs), decodes the rest
  and replies ``done`` with the tokens; ``failed`` with a reason if the transfer fails.
- ``{"cmd": "exit"}`` closes the connector and ends the process.

Tensor parallelism: a fleet of ``tp_size`` such processes (the ``torchrun`` environment: ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) forms one gloo (CPU) or NCCL group. Rank 0 alone reads the
commands and broadcasts them, so every rank admits the same requests in the same order; every rank holds
its own blocks and reports them (``prefilled`` and ``released`` carry the rank), and a decode rank pulls
exactly its KV heads from the prefill ranks that hold them (``kvlayout.tp.source_ranks``). Events that
change the block pool (a hold released, a load finished or failed) take effect on every rank of the fleet
in the same loop iteration, once all ranks have them (a failure on any rank fails the request on all), so
the ranks' schedules never diverge.

Everything crossing the pipes is JSON, and between ranks msgpack; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time

import torch

from ..engine.runner import Engine
from ..engine.tensor_parallel import TensorParallel, total_kv_heads
from ..specs import parse_dtype
from ..tp import num_readers, source_ranks


def emit(obj: dict) -> None:
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def build_engine(cfg: dict, tp: TensorParallel) -> Engine:
    order = None
    if cfg.get("scramble_seed") is not None:
        gen = torch.Generator().manual_seed(int(cfg["scramble_seed"]))
        order = lambda n: torch.randperm(n, generator=gen).tolist()          # noqa: E731
    device = cfg["device"]
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return Engine(cfg["model"], seed=cfg["seed"], backend=cfg["backend"], device=device,
                  dtype=parse_dtype(cfg["dtype"]), block_size=cfg["block_size"], num_blocks=cfg["num_blocks"],
                  max_num_batched_tokens=cfg["max_num_batched_tokens"], cross_layer=cfg.get("cross_layer"),
                  block_order=order, tp=tp)


def _stdin_lines(out: queue.Queue) -> None:
    for line in sys.stdin:
        out.put(line)
    out.put(None)


def engine_threads(num_processes: int = 2) -> int:
    """Torch threads of one demo engine process on the CPU: the engines share the cores, and the
    single-process reference gets the count of one of two, so the timing line compares like with like."""
    return max(1, (os.cpu_count() or 2) // num_processes)


class FleetEvents:
    """Connector events that change the block pool, applied on every rank of a tensor-parallel fleet at
    once: a hold is freed, a load started, when every rank has it; a load fails when any rank's fails."""

    def __init__(self, tp: TensorParallel):
        self.tp = tp
        self.free: set[str] = set()
        self.start: set[str] = set()
        self.failed: dict[str, str] = {}

    def agree(self) -> tuple[list[str], list[str], dict[str, str]]:
        """``(free, start, failed)`` request ids for this iteration, the same on every rank."""
        views = self.tp.all_gather_object([sorted(self.free), sorted(self.start), self.failed])
        failed = {rid: reason for v in views for rid, reason in v[2].items()}
        free = set.intersection(*(set(v[0]) for v in views))
        start = set.intersection(*(set(v[1]) for v in views)) - set(failed)
        self.free -= free
        self.start -= start | set(failed)
        for rid in failed:
            self.failed.pop(rid, None)
        return sorted(free), sorted(start), failed


def serve(cfg: dict) -> None:
    from ..connectors import NixlConnector

    role = cfg["role"]
    if cfg["device"] == "cpu":                 # the engines share the cores
        torch.set_num_threads(engine_threads(cfg.get("num_processes", 2)))
    tp = TensorParallel.from_env(backend=cfg.get("dist_backend", "gloo"))
    peer_tp = int(cfg.get("peer_tp", 1))
    eng = build_engine(cfg, tp)
    kv_heads = total_kv_heads(eng.model.config)
    conn = NixlConnector(eng.caches, specs=eng.plan.specs, engine_id=f"demo-{role}-{tp.rank}", tp_rank=tp.rank,
                         tp_size=tp.size, num_kv_heads=kv_heads, load_timeout_s=cfg.get("load_timeout_s", 60.0))
    emit({"event": "ready", "role": role, "rank": tp.rank, "address": conn.address, "plan": eng.plan.describe(),
          "num_blocks": eng.num_blocks, "block_size": eng.block_size,
          "page_bytes": sum(g.page_size_bytes * g.num_layers for g in eng.plan.groups)})
    commands: queue.Queue = queue.Queue()
    if tp.rank == 0:                           # rank 0 reads the commands and hands them to the fleet
        threading.Thread(target=_stdin_lines, args=(commands,), daemon=True).start()
    fleet = FleetEvents(tp)
    readers = num_readers(tp.rank, tp.size, peer_tp, kv_heads)    # decode ranks reading this rank's heads
    sources = source_ranks(tp.rank, tp.size, peer_tp, kv_heads)   # prefill ranks holding this rank's heads
    started: dict[str, float] = {}
    clean = True                               # False once an exception leaves the loop: no barrier then
    try:
        while True:
            cmds = []
            if tp.rank == 0:
                busy = eng.has_unfinished() or fleet.free or fleet.start
                try:
                    cmds.append(commands.get(timeout=0 if busy else 0.005))
                    while True:
                        cmds.append(commands.get_nowait())
                except queue.Empty:
                    pass
            cmds = tp.broadcast_object([None if c is None else json.loads(c) for c in cmds if c is None or c.strip()])
            for cmd in cmds:
                if cmd is None or cmd["cmd"] == "exit":
                    return                               # the demo went away, or asked us to stop
                if cmd["cmd"] == "prefill":
                    eng.add_request(cmd["prompt"], 1, cmd["id"], keep_blocks=True)
                    started[cmd["id"]] = time.perf_counter()
                elif cmd["cmd"] == "load":
                    rid, holds = cmd["id"], [cmd["params"][s] for s in sources]
                    local = eng.add_remote_request(cmd["prompt"], cmd["first_token"], cmd["max_new_tokens"], rid)
                    conn.start_load(rid, [h["engine"] for h in holds], holds[0]["block_ids"], local,
                                    hold_token=[h["hold_token"] for h in holds])
                    started[rid] = time.perf_counter()
            events = conn.poll()
            for rel in events.released:                  # prefill side: the decode ranks have read them
                fleet.free.add(rel.request_id)
                emit({"event": "released", "id": rel.request_id, "rank": tp.rank, "ok": rel.ok,
                      "reason": rel.reason})
            for rid in events.finished:                  # decode side: this rank's blocks are in place
                info = conn.transfer_info(rid)
                fleet.start.add(rid)
                emit({"event": "transferred", "id": rid, "rank": tp.rank,
                      "seconds": time.perf_counter() - started[rid], "bytes": info.nbytes,
                      "indices": info.num_indices, "descriptors": info.num_descriptors, "index_us": info.index_us,
                      "nixl_prepare_us": info.nixl_prepare_us, "post_us": info.post_us,
                      "transfer_s": info.seconds, "sources": sources})
            fleet.failed.update(events.failed)
            free, start, failed = fleet.agree()
            for rid in free:
                eng.release(rid)
            for rid in start:
                eng.start_remote(rid)
                started[rid] = time.perf_counter()
            for rid, reason in failed.items():
                if rid in eng.held:
                    eng.release(rid)
                if tp.rank == 0:
                    emit({"event": "failed", "id": rid, "reason": reason})
            if eng.has_unfinished():
                result = eng.step()
                for rid in result.finished:
                    req = eng.requests[rid]
                    secs = time.perf_counter() - started.pop(rid)
                    if role == "prefill":
                        params = conn.hold_blocks(rid, req.block_ids, num_readers=readers) if readers else None
                        if params is None:           # replicas another rank serves: nothing to hold
                            fleet.free.add(rid)
                        emit({"event": "prefilled", "id": rid, "rank": tp.rank, "first_token": req.output[0],
                              "params": params, "seconds": secs, "blocks": len(req.block_ids)})
                    elif tp.rank == 0:
                        emit({"event": "done", "id": rid, "tokens": req.output, "seconds": secs})
    except BaseException:
        clean = False
        raise
    finally:
        conn.close()
        tp.close(wait=clean)


def main() -> None:
    try:
        serve(json.loads(sys.argv[1]))
    except Exception as exc:                              # tell the demo why, then fail
        emit({"event": "error", "reason": f"{type(exc).__name__}: {exc}"})
        raise


if __name__ == "__main__":
    main()
