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

Everything crossing the pipes is JSON; nothing is unpickled.
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
from ..specs import parse_dtype


def emit(obj: dict) -> None:
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def build_engine(cfg: dict) -> Engine:
    order = None
    if cfg.get("scramble_seed") is not None:
        gen = torch.Generator().manual_seed(int(cfg["scramble_seed"]))
        order = lambda n: torch.randperm(n, generator=gen).tolist()          # noqa: E731
    return Engine(cfg["model"], seed=cfg["seed"], backend=cfg["backend"], device=cfg["device"],
                  dtype=parse_dtype(cfg["dtype"]), block_size=cfg["block_size"], num_blocks=cfg["num_blocks"],
                  max_num_batched_tokens=cfg["max_num_batched_tokens"], cross_layer=cfg.get("cross_layer"),
                  block_order=order)


def _stdin_lines(out: queue.Queue) -> None:
    for line in sys.stdin:
        out.put(line)
    out.put(None)


def engine_threads() -> int:
    """Torch threads of one demo engine on the CPU: the prefill and decode engines share the cores, and
    the single-process reference gets the same count, so the timing line compares like with like."""
    return max(1, (os.cpu_count() or 2) // 2)


def serve(cfg: dict) -> None:
    from ..connectors import NixlConnector

    role = cfg["role"]
    if cfg["device"] == "cpu":                 # two engines share the cores
        torch.set_num_threads(engine_threads())
    eng = build_engine(cfg)
    conn = NixlConnector(eng.caches, specs=eng.plan.specs, engine_id=f"demo-{role}",
                         load_timeout_s=cfg.get("load_timeout_s", 60.0))
    emit({"event": "ready", "role": role, "address": conn.address, "plan": eng.plan.describe(),
          "num_blocks": eng.num_blocks, "block_size": eng.block_size,
          "page_bytes": sum(g.page_size_bytes * g.num_layers for g in eng.plan.groups)})
    commands: queue.Queue = queue.Queue()
    threading.Thread(target=_stdin_lines, args=(commands,), daemon=True).start()
    started: dict[str, float] = {}
    try:
        while True:
            busy = eng.has_unfinished()
            try:
                line = commands.get(timeout=0 if busy else 0.005)
            except queue.Empty:
                line = ""
            if line is None:
                return                                   # the demo went away
            if line.strip():
                cmd = json.loads(line)
                if cmd["cmd"] == "exit":
                    return
                if cmd["cmd"] == "prefill":
                    eng.add_request(cmd["prompt"], 1, cmd["id"], keep_blocks=True)
                    started[cmd["id"]] = time.perf_counter()
                elif cmd["cmd"] == "load":
                    rid, params = cmd["id"], cmd["params"]
                    local = eng.add_remote_request(cmd["prompt"], cmd["first_token"], cmd["max_new_tokens"], rid)
                    conn.start_load(rid, params["engine"], params["block_ids"], local,
                                    hold_token=params["hold_token"])
                    started[rid] = time.perf_counter()
            events = conn.poll()
            for rel in events.released:                  # prefill side: the decode engine has read them
                eng.release(rel.request_id)
                emit({"event": "released", "id": rel.request_id, "ok": rel.ok, "reason": rel.reason})
            for rid in events.finished:                  # decode side: the blocks are in place
                info = conn.transfer_info(rid)
                eng.start_remote(rid)
                emit({"event": "transferred", "id": rid, "seconds": time.perf_counter() - started[rid],
                      "bytes": info.nbytes, "indices": info.num_indices, "descriptors": info.num_descriptors,
                      "index_us": info.index_us, "nixl_prepare_us": info.nixl_prepare_us,
                      "post_us": info.post_us, "transfer_s": info.seconds})
                started[rid] = time.perf_counter()
            for rid, reason in events.failed.items():
                eng.release(rid)
                emit({"event": "failed", "id": rid, "reason": reason})
            if eng.has_unfinished():
                result = eng.step()
                for rid in result.finished:
                    req = eng.requests[rid]
                    secs = time.perf_counter() - started.pop(rid)
                    if role == "prefill":
                        params = conn.hold_blocks(rid, req.block_ids)
                        emit({"event": "prefilled", "id": rid, "first_token": req.output[0], "params": params,
                              "seconds": secs, "blocks": len(req.block_ids)})
                    else:
                        emit({"event": "done", "id": rid, "tokens": req.output, "seconds": secs})
    finally:
        conn.close()


def main() -> None:
    try:
        serve(json.loads(sys.argv[1]))
    except Exception as exc:                              # tell the demo why, then fail
        emit({"event": "error", "reason": f"{type(exc).__name__}: {exc}"})
        raise


if __name__ == "__main__":
    main()
