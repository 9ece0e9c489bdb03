"""Attention benchmark over kvlayout's packed cache: every registered backend usable on the device, on the
same inputs, next to the device's copy and matmul ceilings measured in the same run.

Workloads (issue 3): decode 64 x 4096, 1 x 131072 and 256 x 512 tokens; causal prefill 4 x 4096; a mixed
step (a 2048-token chunk on a 2048-token prefix plus 60 decodes of 2048) against its prefill-only and
decode-only halves; write_kv of 65536 tokens. 32 query / 8 KV heads, head size 128, bf16, block 16, pages
in random order. Bytes (KV read, q, out; K/V in and cache out for write_kv) and FLOPs (4*H*D per visible
query-key pair) are counted from the inputs. Backends run through ``get_attention_backend(name)``, so a
newly registered backend appears as extra rows; FlashInfer's per-step plan is made once per step (the
first call) and shared, as every layer of a step would.

    python tools/bench_attention.py [--backends triton,flashinfer] [--only decode] [--quick] [--sweep]
                                    [--json PATH]

``--quick``: tiny shapes that run anywhere, the CPU interpreter included (timings then mean nothing).
``--sweep [KINDS]``: also time the Triton kernels over split counts and tile configs (decode, prefill, and
the prefill part of mixed), to tune the launch choices. ``run(quick) -> list[dict]`` is ``kvlayout bench``'s
entry point (the same workloads, no sweep).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, astuple, dataclass, field
from typing import Optional

import torch
# bench_common sets TRITON_INTERPRET=1 on a machine without CUDA, before any kernel is defined
from bench_common import ceilings_row, device_name, measure_ceilings, rate_row, timed, versions

import triton  # noqa: E402

import kvlayout as kvl  # noqa: E402
from kvlayout.backends import available_backends, get_attention_backend  # noqa: E402
from kvlayout.kernels.unified import UnifiedConfig, unified_attention, unified_config  # noqa: E402
from kvlayout.kernels.decode import (DecodeConfig, choose_num_splits, decode_config,  # noqa: E402
                                             device_sms, split_kv_decode)


@dataclass(frozen=True)
class Setup:
    heads: int
    kv_heads: int
    head_size: int
    block_size: int
    dtype: torch.dtype


@dataclass
class Row:
    workload: str
    backend: str
    seconds: float
    metric: str                       # "TB/s" or "TFLOP/s" or "s"
    value: float
    ceiling_pct: Optional[float]
    err_vs_triton: Optional[float] = None
    peer_ratio: Optional[float] = None  # peer time / this time (> 1: faster than the peer)
    note: str = ""
    bytes: Optional[int] = None        # counted from the inputs
    flops: Optional[float] = None


@dataclass
class Results:
    device: str
    versions: dict
    setup: dict
    ceilings: dict
    rows: list = field(default_factory=list)
    sweep: list = field(default_factory=list)


# ---- inputs ---------------------------------------------------------------------------------------

def make_step(pairs, s: Setup, device, gen) -> tuple[torch.Tensor, kvl.AttentionMetadata, torch.Tensor]:
    """Cache, metadata and q for requests ``pairs`` [(cached, new)] (decodes first), pages in random order."""
    need = [-(-(c + n) // s.block_size) for c, n in pairs]
    nb = sum(need) + 1
    kv = torch.randn(nb, s.kv_heads, s.block_size, 2 * s.head_size, device=device, dtype=s.dtype, generator=gen)
    perm = torch.randperm(nb, device=device, generator=gen).tolist()
    reqs, used = [], 0
    for (c, n), k in zip(pairs, need):
        reqs.append(kvl.ScheduledRequest(c, n, perm[used:used + k]))
        used += k
    meta = kvl.build_attention_metadata(reqs, s.block_size, device, num_blocks=nb)
    q = torch.randn(meta.num_actual_tokens, s.heads, s.head_size, device=device, dtype=s.dtype, generator=gen)
    return kv, meta, q


def attn_bytes(pairs, s: Setup) -> int:
    el = s.dtype.itemsize
    kv = sum(c + n for c, n in pairs) * s.kv_heads * 2 * s.head_size * el
    qo = 2 * sum(n for _, n in pairs) * s.heads * s.head_size * el
    table = sum(-(-(c + n) // s.block_size) for c, n in pairs) * 4
    return kv + qo + table


def attn_flops(pairs, s: Setup, causal: bool = True) -> float:
    visible = 0
    for c, n in pairs:
        visible += n * c + (n * (n + 1) // 2 if causal else n * n)
    return 4.0 * s.heads * s.head_size * visible


def workloads(quick: bool) -> dict:
    if quick:
        return {
            "decode-2x40": ("decode", [(39, 1)] * 2),
            "decode-1x600": ("decode", [(599, 1)]),
            "decode-4x16": ("decode", [(15, 1)] * 4),
            "prefill-1x32": ("prefill", [(0, 32)]),
            "mixed": ("mixed", [(23, 1)] * 2 + [(16, 16)]),
            "write_kv-64": ("write_kv", 64),
        }
    return {
        "decode-64x4096": ("decode", [(4095, 1)] * 64),
        "decode-1x131072": ("decode", [(131071, 1)]),
        "decode-256x512": ("decode", [(511, 1)] * 256),
        "prefill-4x4096": ("prefill", [(0, 4096)] * 4),
        "mixed": ("mixed", [(2047, 1)] * 60 + [(2048, 2048)]),
        "write_kv-65536": ("write_kv", 65536),
    }


# ---- the benchmark --------------------------------------------------------------------------------

def run_attention(name, kind, pairs, s, backends, device, gen, res: Results, quick: bool) -> None:
    params = kvl.AttentionParams(s.heads, s.kv_heads, s.head_size)
    kv, meta, q = make_step(pairs, s, device, gen)
    parts = {name: (meta, q, pairs)}
    if kind == "mixed":
        nd = meta.num_decodes
        for part, sub in (("decode-only", pairs[:nd]), ("prefill-only", pairs[nd:])):
            m2, q2 = sub_step(kv, meta, q, sub, nd if part == "prefill-only" else 0, device, s)
            parts[f"{name}:{part}"] = (m2, q2, sub)
    outs = {}
    for b in backends:
        for wname, (m, qq, pp) in parts.items():
            out = torch.empty_like(qq)
            fn = (lambda bb=b, m=m, qq=qq, out=out: bb.forward(qq, kv, m, params, out=out, validate=False))
            try:
                b.forward(qq, kv, m, params, out=out)            # validates, compiles, plans
                t = timed(fn, device, quick)
            except kvl.KVLayoutError as e:
                res.rows.append(Row(wname, b.name, float("nan"), "s", float("nan"), None, note=str(e)[:80]))
                continue
            outs[(wname, b.name)] = out
            work = {"bytes": attn_bytes(pp, s), "flops": attn_flops(pp, s)}
            if kind == "decode":
                v = work["bytes"] / t
                res.rows.append(Row(wname, b.name, t, "TB/s", v / 1e12, 100 * v / 1e12 / res.ceilings["copy_TBps"],
                                    **work))
            elif kind == "prefill":
                v = work["flops"] / t
                res.rows.append(Row(wname, b.name, t, "TFLOP/s", v / 1e12,
                                    100 * v / 1e12 / res.ceilings["matmul_TFLOPs"], **work))
            else:
                res.rows.append(Row(wname, b.name, t, "s", t, None, **work))
    for (wname, bname), out in outs.items():
        ref = outs.get((wname, "triton"))
        if ref is not None:
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            next(r for r in res.rows if r.workload == wname and r.backend == bname).err_vs_triton = err
    if kind == "mixed":
        for b in backends:
            t = {r.workload: r.seconds for r in res.rows if r.backend == b.name and r.workload.startswith(name)}
            row = next((r for r in res.rows if r.workload == name and r.backend == b.name), None)
            if row and all(k in t for k in (f"{name}:decode-only", f"{name}:prefill-only")):
                row.note = f"mixed / (prefill-only + decode-only) = " \
                           f"{t[name] / (t[f'{name}:decode-only'] + t[f'{name}:prefill-only']):.2f}"


def sub_step(kv, meta, q, pairs, first, device, s: Setup):
    """Metadata for requests ``first ..`` of ``meta`` (same pages, same q rows) as a step of their own."""
    bt = meta.block_table[first:first + len(pairs)].cpu()
    reqs = [kvl.ScheduledRequest(c, n, bt[i, : -(-(c + n) // s.block_size)].tolist())
            for i, (c, n) in enumerate(pairs)]
    m = kvl.build_attention_metadata(reqs, s.block_size, device, num_blocks=kv.shape[0])
    t0 = int(meta.query_start_loc_cpu[first])
    return m, q[t0:t0 + m.num_actual_tokens]


def run_write_kv(name, num_tokens, s, backends, device, gen, res: Results, quick: bool) -> None:
    nb = num_tokens // s.block_size + 16
    kv = torch.randn(nb, s.kv_heads, s.block_size, 2 * s.head_size, device=device, dtype=s.dtype, generator=gen)
    k = torch.randn(num_tokens, s.kv_heads, s.head_size, device=device, dtype=s.dtype, generator=gen)
    v = torch.randn_like(k)
    slots = torch.randperm(nb * s.block_size, device=device, generator=gen)[:num_tokens]
    nbytes = 2 * (k.numel() + v.numel()) * k.element_size() + slots.numel() * 8
    for b in backends:
        b.write_kv(kv, k, v, slots)
        t = timed(lambda bb=b: bb.write_kv(kv, k, v, slots, validate=False), device, quick)
        val = nbytes / t / 1e12
        res.rows.append(Row(name, b.name, t, "TB/s", val, 100 * val / res.ceilings["copy_TBps"], bytes=nbytes))


def run_sweep(wname, kind, pairs, s, device, gen, res: Results, quick: bool) -> None:
    """Time the Triton kernels directly over launch choices (split counts, tiles, warps, stages)."""
    params = kvl.AttentionParams(s.heads, s.kv_heads, s.head_size)
    kv, meta, q = make_step(pairs, s, device, gen)
    out = torch.empty_like(q)
    el = s.dtype.itemsize
    if kind == "decode":
        chosen = (choose_num_splits(meta.num_reqs, s.kv_heads, meta.max_seq_len, device_sms(device)),
                  decode_config(s.head_size, el, device.type != "cuda"))
        near = {chosen[0], 2 * chosen[0], max(1, chosen[0] // 2)}
        splits = sorted(near | ({16, 32, 64, 128} if meta.max_seq_len > 32768 else {1, 2, 4}))
        cfgs = [DecodeConfig(64, 4, 3), DecodeConfig(64, 4, 4), DecodeConfig(128, 4, 3), DecodeConfig(32, 4, 4),
                DecodeConfig(128, 8, 2), DecodeConfig(64, 4, 2)]
        for ns in splits:
            for cfg in cfgs:
                fn = (lambda ns=ns, cfg=cfg: split_kv_decode(q, kv, meta.query_start_loc, meta.seq_lens,
                                                             meta.block_table, params, max_seq_len=meta.max_seq_len,
                                                             num_splits=ns, out=out, config=cfg))
                t = timed(fn, device, quick)
                res.sweep.append({"workload": wname, "splits": ns, "config": asdict(cfg), "seconds": t,
                                  "TBps": attn_bytes(pairs, s) / t / 1e12,
                                  "chosen": ns == chosen[0] and cfg == chosen[1]})
    elif kind == "prefill":
        chosen = unified_config(meta.max_query_len, s.heads // s.kv_heads, s.head_size, el, device.type != "cuda")
        g = triton.next_power_of_2(s.heads // s.kv_heads)
        cfgs = {chosen, UnifiedConfig(128 // g, 64, 4, 3), UnifiedConfig(256 // g, 64, 8, 3),
                UnifiedConfig(256 // g, 64, 8, 4), UnifiedConfig(256 // g, 64, 8, 2), UnifiedConfig(256 // g, 64, 16, 3),
                UnifiedConfig(256 // g, 128, 8, 2), UnifiedConfig(256 // g, 32, 8, 4),
                UnifiedConfig(64 // g, 64, 4, 3)}
        for cfg in sorted(cfgs, key=astuple):
            fn = (lambda cfg=cfg: unified_attention(q, kv, out, meta.query_start_loc, meta.seq_lens, meta.block_table,
                                                    params, num_tokens=meta.num_actual_tokens,
                                                    max_query_len=meta.max_query_len, config=cfg))
            try:
                t = timed(fn, device, quick)
            except Exception as e:                                       # e.g. out of shared memory
                res.sweep.append({"workload": wname, "config": asdict(cfg), "error": str(e)[:120]})
                continue
            res.sweep.append({"workload": wname, "config": asdict(cfg), "seconds": t,
                              "TFLOPs": attn_flops(pairs, s) / t / 1e12, "chosen": cfg == chosen})


# ---- output ---------------------------------------------------------------------------------------

def print_table(res: Results, peer: str) -> None:
    c = res.ceilings
    print(f"\n{res.device}  |  {', '.join(f'{k} {v}' for k, v in res.versions.items())}")
    print(f"ceilings (this run): copy {c['copy_TBps']:.2f} TB/s, {c['matmul_dtype']} "
          f"matmul {c['matmul_n']}^3 {c['matmul_TFLOPs']:.0f} TFLOP/s")
    print(f"{'workload':<28}{'backend':<12}{'time us':>10}{'achieved':>18}{'% ceil':>8}{'x ' + peer:>14}"
          f"{'err vs triton':>15}  note")
    for r in res.rows:
        ach = f"{r.value:.3f} {r.metric}" if r.metric != "s" else "-"
        pct = f"{r.ceiling_pct:.0f}%" if r.ceiling_pct is not None else "-"
        ratio = f"{r.peer_ratio:.2f}" if r.peer_ratio is not None else "-"
        err = f"{r.err_vs_triton:.1e}" if r.err_vs_triton is not None else "-"
        print(f"{r.workload:<28}{r.backend:<12}{r.seconds * 1e6:>10.1f}{ach:>18}{pct:>8}{ratio:>14}{err:>15}  {r.note}")
    if res.sweep:
        print("\nTriton launch-choice sweep (* = the default choice):")
        for sw in res.sweep:
            if "error" in sw:
                print(f"  {sw['workload']:<20} {sw['config']}  failed: {sw['error']}")
                continue
            rate = f"{sw['TBps']:.3f} TB/s" if "TBps" in sw else f"{sw['TFLOPs']:.1f} TFLOP/s"
            sp = f"splits {sw['splits']:>3} " if "splits" in sw else ""
            print(f"  {sw['workload']:<20} {sp}{tuple(sw['config'].values())}  {sw['seconds'] * 1e6:9.1f} us  "
                  f"{rate}{'  *' if sw.get('chosen') else ''}")


def bench(quick: bool, backends: Optional[str] = None, only: Optional[str] = None, sweep: str = "",
          peer: str = "flashinfer") -> Results:
    """Run the workloads (``only``: names containing it) on ``backends`` (comma-separated; default: every
    usable one but the torch reference, which quick runs include) and the sweeps for the kinds in ``sweep``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    s = Setup(4, 2, 64, 16, torch.bfloat16 if gpu else torch.float16) if quick else \
        Setup(32, 8, 128, 16, torch.bfloat16)
    usable = [n for n, why in available_backends(device).items() if why is None]
    names = backends.split(",") if backends else [n for n in usable if n != "torch" or quick]
    if "triton" not in names and "triton" in usable:
        names.insert(0, "triton")                                        # the error column's reference
    bes = [get_attention_backend(n, device) for n in names]
    gen = torch.Generator(device).manual_seed(0)
    res = Results(device_name(device), versions(), asdict(s) | {"dtype": str(s.dtype)},
                  measure_ceilings(device, quick))
    for wname, (kind, spec) in workloads(quick).items():
        if only and only not in wname:
            continue
        print(f"... {wname}", file=sys.stderr, flush=True)
        if kind == "write_kv":
            run_write_kv(wname, spec, s, bes, device, gen, res, quick)
        else:
            run_attention(wname, kind, spec, s, bes, device, gen, res, quick)
        if kind in sweep.split(",") and kind != "write_kv":
            if kind == "mixed":                                          # its prefill part alone
                pre = [p for p in spec if p[1] > 1]
                run_sweep(f"{wname}:prefill-only", "prefill", pre, s, device, gen, res, quick)
            else:
                run_sweep(wname, kind, spec, s, device, gen, res, quick)
        if gpu:
            torch.cuda.empty_cache()
    for r in res.rows:
        p = next((p for p in res.rows if p.workload == r.workload and p.backend == peer), None)
        if p is not None and r.backend != peer and p.seconds == p.seconds:
            r.peer_ratio = p.seconds / r.seconds
    return res


def run(quick: bool) -> list[dict]:
    """``kvlayout bench``'s entry point: what ``main`` runs (no sweep), as rows of its schema. The mixed
    step's rows carry the rate of whichever ceiling binds (bytes over copy or FLOPs over matmul)."""
    res = bench(quick)
    rows = [ceilings_row(res.ceilings, "cuda" if torch.cuda.is_available() else "cpu")]
    for r in res.rows:
        row = {"name": r.workload, "backend": r.backend, "note": r.note, "err_vs_triton": r.err_vs_triton,
               "peer_ratio": r.peer_ratio}
        if r.seconds != r.seconds:                                       # not run: the backend refused
            rows.append({**row, "note": f"not run: {r.note}"})
            continue
        rows.append({**row, **rate_row(r.seconds, res.ceilings, r.bytes, r.flops,
                                       None if r.metric == "s" else r.metric)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", help="comma-separated names (default: every usable one but the torch reference; "
                                       "with --quick, torch too)")
    ap.add_argument("--only", help="run only workloads whose name contains this")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (runs anywhere, the CPU interpreter too)")
    ap.add_argument("--sweep", nargs="?", const="decode,prefill,mixed", default="",
                    help="also sweep the Triton launch choices for these workload kinds (default: all)")
    ap.add_argument("--peer", default="flashinfer", help="backend the ratio column compares with")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    res = bench(args.quick, args.backends, args.only, args.sweep, args.peer)
    print_table(res, args.peer)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(res), f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
