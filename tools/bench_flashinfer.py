"""FlashInfer on kvlayout's packed views against FlashInfer on its native contiguous K/V, our Triton
backend (when registered and usable) and the device ceilings, all in one run on the same inputs.

Shapes are issue 3's: decode batch 64 x 4096, 1 x 128k and 256 x 512 tokens; causal prefill 4 x 4096;
a mixed step (a 2048-token chunk on a 2048-token prefix plus 60 decodes of 2048); write_kv of 64k
tokens. 32 query / 8 KV heads, head size 128, bf16, block 16, blocks in random order. Bytes and FLOPs
are counted from the inputs. Also: the host cost of plan() per step for a batch of 256 decodes.

    python tools/bench_flashinfer.py [--out results.json] [--iters 20] [--quick]

``--quick``: tiny shapes (a smoke test; timings then mean little). ``run(quick) -> list[dict]`` is ``kvlayout
bench``'s entry point; without CUDA or FlashInfer it returns one row saying why it was skipped.

On the GPU machine (no network) FlashInfer comes as wheels in .whl-fi (flashinfer_python 0.7.2.post1 and
apache_tvm_ffi 0.1.15.post2): install them with ``pip install --no-index --no-deps --target /tmp/site
.whl-fi/*.whl`` and kvlayout with ``pip install --no-deps --no-build-isolation --no-index --target /tmp/kvl .``,
then ``PYTHONPATH=/tmp/kvl:/tmp/site FLASHINFER_WORKSPACE_BASE=/tmp/fiws FLASHINFER_CUDA_ARCH_LIST=9.0a``.
FlashInfer compiles each kernel variant on first use (about 10 s to 70 s each, more when several build
at once), so run the GPU tests first (``pytest -m gpu tests/test_flashinfer_backend.py``, split with -k
into parallel shards to compile in parallel) and this benchmark after them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from bench_common import ceilings_row, measure_ceilings, rate_row, timed

import kvlayout as kvl
from kvlayout.backends import available_backends, get_attention_backend
from kvlayout.backends.flashinfer_backend import FlashInferBackend, packed_kv_views

HQ, HKV, D, BS, DT = 32, 8, 128, 16, torch.bfloat16
PARAMS = kvl.AttentionParams(HQ, HKV, D)


def make_step(pairs, gen, hq=HQ):
    """Metadata, a random packed cache and q for (computed, new) pairs, blocks in random order."""
    need = [-(-(c + t) // BS) for c, t in pairs]
    nb = sum(need)
    perm = torch.randperm(nb, generator=gen).tolist()
    reqs, at = [], 0
    for (c, t), k in zip(pairs, need):
        reqs.append(kvl.ScheduledRequest(c, t, perm[at:at + k]))
        at += k
    meta = kvl.build_attention_metadata(reqs, BS, "cuda", num_blocks=nb)
    kv = torch.empty(nb, HKV, BS, 2 * D, dtype=DT, device="cuda").normal_(0, 0.5)
    q = torch.empty(meta.num_actual_tokens, hq, D, dtype=DT, device="cuda").normal_()
    return meta, kv, q


def kv_bytes(pairs) -> int:
    return sum(c + t for c, t in pairs) * HKV * 2 * D * DT.itemsize


def attn_flops(pairs) -> float:
    """4·Hq·D per visible (query, key) pair, causal."""
    return 4.0 * HQ * D * sum(t * c + t * (t + 1) / 2 for c, t in pairs)


def run_parts(step, q, kv, out):
    for p in step.parts:
        p.slot.wrapper.run(q[p.t0:p.t1], kv, out=out[p.t0:p.t1])


def bench_attention(name, pairs, metric, iters, gen, triton, extra_backends=()):
    meta, kv, q = make_step(pairs, gen)
    fi = FlashInferBackend()
    fi.plan(meta, PARAMS, DT)
    (step,) = meta.step_state.states()
    packed = packed_kv_views(kv)
    native = tuple(t.contiguous() for t in packed)
    out_p, out_n, out_b = (torch.empty_like(q) for _ in range(3))
    res = {"shape": name}
    res["fi_packed_s"] = timed(lambda: run_parts(step, q, packed, out_p), "cuda", iters=iters)
    res["fi_native_s"] = timed(lambda: run_parts(step, q, native, out_n), "cuda", iters=iters)
    res["kvlayout_fwd_s"] = timed(lambda: fi.forward(q, kv, meta, PARAMS, out=out_b, validate=False), "cuda",
                                  iters=iters)
    res["bit_equal"] = bool(torch.equal(out_p, out_n) and torch.equal(out_p, out_b))
    for label, be in extra_backends:
        res[f"{label}_s"] = timed(lambda: be.forward(q, kv, meta, PARAMS, out=out_b, validate=False), "cuda",
                                  iters=iters)
    if triton is not None:
        try:
            res["triton_s"] = timed(lambda: triton.forward(q, kv, meta, PARAMS, out=out_b, validate=False),
                                    "cuda", iters=iters)
        except Exception as e:                          # report, do not hide, a backend that fails here
            res["triton_error"] = f"{type(e).__name__}: {e}"[:200]
    res["metric"] = metric
    res["work"] = {"TB/s": kv_bytes(pairs), "TFLOP/s": attn_flops(pairs)}.get(metric)
    res["bytes"], res["flops"] = kv_bytes(pairs), attn_flops(pairs)
    kv = native = packed = None                          # free the caches (the lambdas above hold their names)
    torch.cuda.empty_cache()
    return res


def bench_decode_groups(iters, gen, quick: bool = False) -> list:
    """Decode TB/s on CUDA cores vs tensor cores for GQA groups 1..8 (8 KV heads): picks the rule."""
    rows = []
    shapes = (("4x256", [(255, 1)] * 4),) if quick else (("64x4096", [(4095, 1)] * 64), ("256x512", [(511, 1)] * 256))
    for name, pairs in shapes:
        meta, kv, _ = make_step(pairs, gen)
        for g in (1, 2, 4, 8):
            params = kvl.AttentionParams(HKV * g, HKV, D)
            q = torch.empty(meta.num_actual_tokens, HKV * g, D, dtype=DT, device="cuda").normal_()
            out = torch.empty_like(q)
            row = {"shape": name, "group": g}
            for label, tc in (("cuda_core", False), ("tensor_core", True)):
                be = FlashInferBackend(decode_tensor_cores=tc)
                t = timed(lambda: be.forward(q, kv, meta, params, out=out, validate=False), "cuda", iters=iters)
                row[label + "_TBps"] = kv_bytes(pairs) / t / 1e12
            rows.append(row)
        kv = None
        torch.cuda.empty_cache()
    return rows


def bench_plan_cost(batch, seq, reps=50) -> dict:
    """Host µs of plan() per step (fresh metadata each time, as in a real step) for a decode batch."""
    gen = torch.Generator().manual_seed(1)
    fi = FlashInferBackend()
    pairs = [(seq - 1, 1)] * batch
    need = -(-seq // BS)
    metas = []
    for _ in range(reps + 5):
        perm = torch.randperm(batch * need, generator=gen).tolist()
        reqs = [kvl.ScheduledRequest(c, t, perm[i * need:(i + 1) * need]) for i, (c, t) in enumerate(pairs)]
        metas.append(kvl.build_attention_metadata(reqs, BS, "cuda", num_blocks=batch * need))
    torch.cuda.synchronize()
    total, inner = [], []
    for m in metas:
        t0 = time.perf_counter()
        fi.plan(m, PARAMS, DT)
        total.append(time.perf_counter() - t0)
        (step,) = m.step_state.states()
        p = step.parts[0]
        t0 = time.perf_counter()
        p.slot.wrapper.plan(*p.plan_args, **p.plan_kwargs)
        inner.append(time.perf_counter() - t0)
    return {"batch": batch, "plan_us": statistics.median(total[5:]) * 1e6,
            "flashinfer_plan_us": statistics.median(inner[5:]) * 1e6}


def bench_write_kv(num_tokens, iters, gen) -> dict:
    nb = num_tokens // BS + 64
    kv = torch.zeros(nb, HKV, BS, 2 * D, dtype=DT, device="cuda")
    blocks = torch.randperm(nb, generator=gen)[: num_tokens // BS]
    slots = (blocks.view(-1, 1) * BS + torch.arange(BS)).reshape(-1).cuda()
    k = torch.randn(num_tokens, HKV, D, dtype=DT, device="cuda")
    v = torch.randn(num_tokens, HKV, D, dtype=DT, device="cuda")
    moved = 2 * 2 * k.numel() * k.element_size()            # read k, v; write them into the cache
    res = {"tokens": num_tokens, "bytes": moved}
    expect = None
    for how in ("torch", "triton", "flashinfer"):
        be = FlashInferBackend(append=how)
        try:
            kv.zero_()
            be.write_kv(kv, k, v, slots, validate=False)
            if expect is None:
                expect = kv.clone()
            res[f"{how}_equal"] = bool(torch.equal(kv, expect))
            res[f"{how}_s"] = timed(lambda: be.write_kv(kv, k, v, slots, validate=False), "cuda", iters=iters)
        except Exception as e:
            res[f"{how}_error"] = f"{type(e).__name__}: {e}"[:200]
    return res


def attention_shapes(quick: bool) -> list:
    """(name, pairs, metric, extra backends): issue 3's shapes, or tiny ones when quick."""
    cc = [("fi_cuda_core", FlashInferBackend(decode_tensor_cores=False)),
          ("fi_tensor_core", FlashInferBackend(decode_tensor_cores=True))]
    if quick:
        return [
            ("decode 4x256", [(255, 1)] * 4, "TB/s", cc),
            ("decode 16x64", [(63, 1)] * 16, "TB/s", cc),
            ("prefill 2x256", [(0, 256)] * 2, "TFLOP/s", []),
            ("mixed 128+6x128", [(127, 1)] * 6 + [(128, 128)], "ms", []),
            ("  prefill part", [(128, 128)], "TFLOP/s", []),
            ("  decode part", [(127, 1)] * 6, "TB/s", []),
        ]
    return [
        ("decode 64x4096", [(4095, 1)] * 64, "TB/s", cc),
        ("decode 1x128k", [(131071, 1)], "TB/s", cc),
        ("decode 256x512", [(511, 1)] * 256, "TB/s", cc),
        ("prefill 4x4096", [(0, 4096)] * 4, "TFLOP/s", []),
        ("mixed 2048+60x2048", [(2047, 1)] * 60 + [(2048, 2048)], "ms", []),
        ("  prefill part", [(2048, 2048)], "TFLOP/s", []),
        ("  decode part", [(2047, 1)] * 60, "TB/s", []),
    ]


def collect(iters: int, quick: bool = False) -> dict:
    """Every measurement (needs CUDA); each part that fails is reported as an error entry."""
    gen = torch.Generator().manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "ceilings": measure_ceilings("cuda", quick)}
    triton = None
    if available_backends("cuda").get("triton") is None:
        triton = get_attention_backend("triton", "cuda")
    rows = []
    for name, pairs, metric, extra in attention_shapes(quick):
        try:
            rows.append(bench_attention(name, pairs, metric, iters, gen, triton, extra))
        except Exception as e:
            rows.append({"shape": name, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    results["attention"] = rows
    try:
        results["decode_groups"] = bench_decode_groups(iters, gen, quick)
    except Exception as e:
        results["decode_groups"] = [{"error": f"{type(e).__name__}: {e}"[:300]}]
    try:
        results["plan"] = bench_plan_cost(*((16, 64, 10) if quick else (256, 512)))
    except Exception as e:
        results["plan"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    try:
        results["write_kv"] = bench_write_kv(1024 if quick else 65536, iters, gen)
    except Exception as e:
        results["write_kv"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return results


LABELS = {"fi_packed": "flashinfer packed views", "fi_native": "flashinfer native K/V",
          "kvlayout_fwd": "kvlayout flashinfer backend", "fi_cuda_core": "flashinfer cuda-core decode",
          "fi_tensor_core": "flashinfer tensor-core decode"}


def run(quick: bool) -> list[dict]:
    """``kvlayout bench``'s entry point: ``collect`` as rows of its schema (the mixed step in whichever
    rate binds); one row saying why when there is no CUDA device or no FlashInfer."""
    why = "needs a CUDA GPU" if not torch.cuda.is_available() else available_backends("cuda").get("flashinfer")
    if why:
        return [{"name": "flashinfer", "backend": "flashinfer", "note": f"skipped: {why}"}]
    res = collect(5 if quick else 20, quick)
    c = res["ceilings"]
    rows = [ceilings_row(c, "cuda")]
    step = ""
    for r in res["attention"]:
        name = f"{step}: {r['shape'].strip()}" if r["shape"].startswith(" ") else r["shape"]
        step = step if r["shape"].startswith(" ") else r["shape"]             # the step "  ... part" rows split
        if "error" in r:
            rows.append({"name": name, "backend": "flashinfer", "error": r["error"]})
            continue
        unit = None if r["metric"] == "ms" else r["metric"]
        for key, t in r.items():
            if key.endswith("_s"):
                note = f"bit-equal to native: {r['bit_equal']}" if key == "kvlayout_fwd_s" else ""
                rows.append({"name": name, "backend": LABELS.get(key[:-2], key[:-2]), "note": note,
                             **rate_row(t, c, r["bytes"], r["flops"], unit)})
        if "triton_error" in r:
            rows.append({"name": name, "backend": "triton", "error": r["triton_error"]})
    for g in res["decode_groups"]:
        if "error" in g:
            rows.append({"name": "decode by GQA group", "backend": "flashinfer", "error": g["error"]})
            continue
        for label in ("cuda_core", "tensor_core"):
            rows.append({"name": f"decode {g['shape']}, GQA group {g['group']}", "unit": "TB/s",
                         "backend": f"flashinfer {label.replace('_', '-')} decode", "achieved": g[f"{label}_TBps"],
                         "ceiling": c["copy_TBps"]})
    p = res["plan"]
    if "error" in p:
        rows.append({"name": "plan() per step", "backend": "flashinfer", "error": p["error"]})
    else:
        for backend, key in (("kvlayout flashinfer backend", "plan_us"), ("flashinfer", "flashinfer_plan_us")):
            rows.append({"name": f"plan() per step, {p['batch']} decodes", "backend": backend,
                         "seconds": p[key] * 1e-6, "note": "host time"})
    w = res["write_kv"]
    if "error" in w:
        rows.append({"name": "write_kv", "backend": "flashinfer", "error": w["error"]})
    for how in ("torch", "triton", "flashinfer") if "error" not in w else ():
        name, backend = f"write_kv {w['tokens']} tokens", f"append={how}"
        if f"{how}_error" in w:
            rows.append({"name": name, "backend": backend, "error": w[f"{how}_error"]})
        elif f"{how}_s" in w:
            rows.append({"name": name, "backend": backend, **rate_row(w[f"{how}_s"], c, w["bytes"], unit="TB/s"),
                         "note": "" if w.get(f"{how}_equal") else "DIFFERS from append=torch"})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    results = collect(args.iters, args.quick)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print_table(results)
    return 0


def rate(r, key):
    t = r.get(key)
    if t is None or r["work"] is None:
        return "-" if t is None else f"{t * 1e3:7.3f}"
    v = r["work"] / t / 1e12
    return f"{v:7.2f}"


def print_table(res) -> None:
    c = res["ceilings"]
    print(f"\n{res['device']}: copy ceiling {c['copy_TBps']:.2f} TB/s, bf16 matmul {c['matmul_TFLOPs']:.0f} TFLOP/s")
    print(f"{'shape':22} {'unit':8} {'fi packed':>9} {'fi native':>9} {'packed/nat':>10} {'kvl fwd':>8} "
          f"{'triton':>8} {'bit-eq':>6} {'ms packed':>9}")
    for r in res["attention"]:
        if "error" in r:
            print(f"{r['shape']:22} ERROR {r['error']}")
            continue
        ratio = r["fi_native_s"] / r["fi_packed_s"]
        ok = "ok" if ratio >= 0.97 else "SLOW"
        print(f"{r['shape']:22} {r['metric']:8} {rate(r, 'fi_packed_s'):>9} {rate(r, 'fi_native_s'):>9} "
              f"{ratio:8.3f} {ok:>2}{rate(r, 'kvlayout_fwd_s'):>8} {rate(r, 'triton_s'):>8} "
              f"{str(r['bit_equal']):>6} {r['fi_packed_s'] * 1e3:9.3f}")
        for k in r:
            if k.endswith("_s") and k not in ("fi_packed_s", "fi_native_s", "kvlayout_fwd_s", "triton_s"):
                print(f"{'':22} {k[:-2]}: {rate(r, k)} {r['metric']}")
        if "triton_error" in r:
            print(f"{'':22} triton: {r['triton_error']}")
    mixed = {r["shape"].strip(): r for r in res["attention"] if "error" not in r}
    whole = next((k for k in mixed if k.startswith("mixed")), None)
    if whole and {"prefill part", "decode part"} <= set(mixed):
        m = mixed[whole]["fi_packed_s"]
        s = mixed["prefill part"]["fi_packed_s"] + mixed["decode part"]["fi_packed_s"]
        print(f"mixed step {m * 1e3:.3f} ms vs prefill-only + decode-only {s * 1e3:.3f} ms ({m / s:.2f}x)")
    groups = res.get("decode_groups", [])
    if groups and "error" in groups[0]:
        print(f"decode by GQA group: ERROR {groups[0]['error']}")
    elif groups:
        print("decode TB/s by GQA group (8 KV heads): " + "; ".join(
            f"{r['shape']} g{r['group']} cc {r['cuda_core_TBps']:.2f} tc {r['tensor_core_TBps']:.2f}"
            for r in groups))
    p = res["plan"]
    if "error" in p:
        print(f"plan(): ERROR {p['error']}")
    else:
        print(f"plan() host cost, batch {p['batch']} decodes: {p['plan_us']:.0f} us per step "
              f"(FlashInfer's own plan {p['flashinfer_plan_us']:.0f} us)")
    w = res["write_kv"]
    if "error" in w:
        print(f"write_kv: ERROR {w['error']}")
    else:
        parts = []
        for how in ("torch", "triton", "flashinfer"):
            if f"{how}_s" in w:
                parts.append(f"{how} {w['bytes'] / w[how + '_s'] / 1e12:.2f} TB/s"
                             f"{'' if w.get(how + '_equal') else ' (DIFFERS)'}")
            elif f"{how}_error" in w:
                parts.append(f"{how} error: {w[how + '_error'][:80]}")
        print(f"write_kv {w['tokens']} tokens: " + ", ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
