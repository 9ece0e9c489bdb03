"""A seeded fuzzer over every public entry point: each valid call is perturbed one argument at a time, on
the ``torch`` backend and on ``triton`` and ``rocm`` (the CPU interpreter). Every perturbed call must end
one of two ways:

- refused: a ``KVLayoutError`` with a message, and every cache byte (and any ``out``/``lse`` buffer)
  unchanged;
- accepted: no error, and on a backend the same result as ``torch`` gives on the same inputs (the
  backends accept and refuse the same calls).

Anything else (another exception type, a refusal that changed memory, backends that disagree) fails.
Perturbations marked ``must`` are never valid (wrong dtype, device, shape, type; out-of-range or
hand-edited indices) and must be refused. The counts are printed (``pytest -s``) for the notes.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Any, Callable

import pytest
import torch

import kvlayout as kvl
from kvlayout import ops
from kvlayout.backends import get_attention_backend
from kvlayout.errors import KVLayoutError
from kvlayout.kernels import interpreting
from kvlayout.metadata import validate_attention_metadata

H, HQ, D, BS, NB = 2, 4, 64, 4, 10          # head size 64: the smallest the Triton backends take
BACKENDS = ("torch", "triton", "rocm")
SEED = 20261206


class Attn(kvl.AttentionLayer, torch.nn.Module):
    pass


class MLA(kvl.MLALayer, torch.nn.Module):
    pass


class World:
    """A cache of fp32, fp8 and MLA layers over random bytes and one valid mixed step for them: request 0
    decodes one token after 5 cached (blocks 3, 0), request 1 prefills 4 (block 5), request 2 appends 2
    after 4 cached (blocks 7, 2; block 2 starts fresh)."""

    def __init__(self):
        g = torch.Generator().manual_seed(SEED)
        self.specs = {"f32": kvl.AttentionSpec(H, D, torch.float32, BS),
                      "fp8": kvl.AttentionSpec(H, D, torch.float8_e4m3fn, BS),
                      "mla": kvl.MLASpec(12, 4, torch.float32, BS)}
        self.caches = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout(self.specs, NB))
        for name in self.specs:
            view = self.caches[name]
            view.copy_(torch.randn(view.shape, generator=g).clamp(-4, 4))
        self.reqs = [kvl.ScheduledRequest(5, 1, [3, 0]), kvl.ScheduledRequest(0, 4, [5]),
                     kvl.ScheduledRequest(4, 2, [7, 2])]
        self.meta = kvl.build_attention_metadata(self.reqs, BS, num_blocks=NB)
        self.params = kvl.AttentionParams(HQ, H, D)
        t = self.t = self.meta.num_actual_tokens
        self.q = torch.randn(t, HQ, D, generator=g)
        self.k = torch.randn(t, H, D, generator=g)
        self.v = torch.randn(t, H, D, generator=g)
        self.latent = torch.randn(t, 16, generator=g)
        self.q_mla = torch.randn(t, HQ, 16, generator=g)
        self.out = torch.full_like(self.q, float("nan"))
        self.lse = torch.full((t, HQ), float("nan"))
        self.scale = torch.tensor([0.5, 0.25])
        self.attn = Attn(layer_name="f32", spec=self.specs["f32"], num_heads=HQ)
        self.attn.bind_kv_cache(self.caches["f32"])
        self.mla = MLA(layer_name="mla", spec=self.specs["mla"], num_heads=HQ, scale=0.25)
        self.mla.bind_kv_cache(self.caches["mla"])
        self.state = torch.randn(t, HQ, D, generator=g), torch.randn(t, HQ, generator=g)
        self.state_b = torch.randn(t, HQ, D, generator=g), torch.randn(t, HQ, generator=g)
        self.padded = [torch.randn(2, 5, n, D, generator=g) for n in (HQ, H, H)]

    def snapshot(self) -> list[torch.Tensor]:
        return [b.clone() for b in self.caches.buffers] + [self.out.clone(), self.lse.clone()]


def same_bytes(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ perturbations

class Perturbation:
    """``apply(value, rng) -> value``, or raises ``Skip`` when it does not apply to ``value``."""

    def __init__(self, name: str, apply: Callable[[Any, random.Random], Any], must: bool):
        self.name, self.apply, self.must = name, apply, must


class Skip(Exception):
    pass


def _tensor(fn):
    def apply(x, rng):
        if not isinstance(x, torch.Tensor):
            raise Skip
        return fn(x, rng)
    return apply


def _float_tensor(fn):
    def apply(x, rng):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.numel() == 0:
            raise Skip
        return fn(x, rng)
    return apply


def _index_tensor(fn):
    def apply(x, rng):
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int32, torch.int64) or x.numel() == 0:
            raise Skip
        y = x.clone()
        fn(y.view(-1), rng)
        return y
    return apply


def _set_at(value):
    def edit(flat, rng):
        flat[rng.randrange(flat.numel())] = value
    return edit


def _set_first(value):
    def edit(flat, rng):
        flat[0] = value
    return edit


def _drop_row(x, rng):
    if x.dim() == 0 or x.shape[0] == 0:
        raise Skip
    return x[:-1]


def _other_dtype(x, rng):
    if x.dtype.is_floating_point:
        return x.double() if x.dtype != torch.float64 else x.float()
    return x.float()


TENSOR_PERTURBATIONS = [
    Perturbation("other dtype", _tensor(_other_dtype), True),
    Perturbation("bool", _tensor(lambda x, r: x.bool()), True),
    Perturbation("one row fewer", _tensor(_drop_row), True),
    Perturbation("flattened", _tensor(lambda x, r: x.reshape(-1) if x.dim() > 1 else x.reshape(1, -1)), True),
    Perturbation("extra dim", _tensor(lambda x, r: x.unsqueeze(0)), True),
    Perturbation("meta device", _tensor(lambda x, r: x.to("meta")), True),
    Perturbation("a list", _tensor(lambda x, r: x.tolist()), True),         # see Call.allowed: ids may be lists
    Perturbation("a string", _tensor(lambda x, r: "x"), True),
    Perturbation("None", _tensor(lambda x, r: None), False),
    Perturbation("strided", _tensor(lambda x, r: x.transpose(-1, -2) if x.dim() > 1 else x[::2]), False),
    Perturbation("NaN", _float_tensor(lambda x, r: torch.full(x.shape, float("nan")).to(x.dtype)), False),
    Perturbation("inf", _float_tensor(lambda x, r: torch.full(x.shape, float("inf")).to(x.dtype)), False),
    Perturbation("negative", _float_tensor(lambda x, r: x.float().abs().neg().to(x.dtype)), False),
    Perturbation("first index 2**31-1", _index_tensor(_set_first(2 ** 31 - 1)), True),
    Perturbation("first index -2", _index_tensor(_set_first(-2)), True),
    Perturbation("index -1", _index_tensor(_set_at(-1)), False),
    Perturbation("index repeated", _index_tensor(lambda f, r: f.__setitem__(slice(1, None), f[0])
                                                 if f.numel() > 1 else None), False),
]


def _scalar(fn):
    def apply(x, rng):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise Skip
        return fn(x, rng)
    return apply


SCALAR_PERTURBATIONS = [
    Perturbation("0", _scalar(lambda x, r: 0), False),
    Perturbation("-1", _scalar(lambda x, r: -1), False),
    Perturbation("2**31-1", _scalar(lambda x, r: 2 ** 31 - 1), False),
    Perturbation("True", _scalar(lambda x, r: True), False),
    Perturbation("1.5", _scalar(lambda x, r: x + 0.5), False),
    Perturbation("NaN", _scalar(lambda x, r: float("nan")), True),
    Perturbation("inf", _scalar(lambda x, r: float("inf")), True),
    Perturbation("a string", _scalar(lambda x, r: "3"), True),
    Perturbation("None", _scalar(lambda x, r: None), False),
]


def _edit_meta(edit):
    def apply(meta, rng):
        if not isinstance(meta, kvl.AttentionMetadata):
            raise Skip
        copy = kvl.build_attention_metadata(World().reqs, BS, num_blocks=NB)
        return edit(copy, rng)
    return apply


def _in_place(field, value):
    def edit(meta, rng):
        t = getattr(meta, field)
        t.view(-1)[rng.randrange(t.numel())] = value(t)
        return meta
    return edit


def _replace(meta, rng):
    return dataclasses.replace(meta, num_decodes=meta.num_decodes)


def _swap_field(meta, rng):
    object.__setattr__(meta, "seq_lens", meta.seq_lens + 3)
    return meta


META_PERTURBATIONS = [
    Perturbation("block_table entry 2**31-1", _edit_meta(_in_place("block_table", lambda t: 2 ** 31 - 1)), True),
    Perturbation("block_table entry -1", _edit_meta(_in_place("block_table", lambda t: -1)), True),
    Perturbation("block_table entry repeated", _edit_meta(_in_place("block_table", lambda t: int(t[0, 0]))), True),
    Perturbation("seq_lens past the table", _edit_meta(_in_place("seq_lens", lambda t: 1000)), True),
    Perturbation("slot_mapping edited", _edit_meta(_in_place("slot_mapping", lambda t: int(t[0]))), True),
    Perturbation("query_start_loc edited", _edit_meta(_in_place("query_start_loc", lambda t: 2)), True),
    Perturbation("dataclasses.replace", _edit_meta(_replace), True),
    Perturbation("field swapped", _edit_meta(_swap_field), True),
    Perturbation("a dict", lambda m, r: dataclasses.asdict(m) if isinstance(m, kvl.AttentionMetadata) else
                 (_ for _ in ()).throw(Skip), True),
]


def _requests(edit):
    def apply(reqs, rng):
        if not isinstance(reqs, list) or not all(isinstance(r, kvl.ScheduledRequest) for r in reqs):
            raise Skip
        return edit([dataclasses.replace(r) for r in reqs], rng)
    return apply


def _set_req(i, **changes):
    def edit(reqs, rng):
        reqs[i] = dataclasses.replace(reqs[i], **changes)
        return reqs
    return edit


REQUEST_PERTURBATIONS = [
    Perturbation("one block twice", _requests(_set_req(0, block_ids=[3, 3])), True),
    Perturbation("two requests write one block", _requests(_set_req(2, num_computed_tokens=0, block_ids=[5])), True),
    Perturbation("write into another's prefix", _requests(_set_req(1, block_ids=[3])), True),
    Perturbation("too few blocks", _requests(_set_req(2, block_ids=[7])), True),
    Perturbation("block id out of range", _requests(_set_req(0, block_ids=[3, NB])), True),
    Perturbation("negative block id", _requests(_set_req(0, block_ids=[-1, 0])), True),
    Perturbation("float block ids", _requests(_set_req(0, block_ids=[3.0, 0.5])), True),
    Perturbation("negative tokens", _requests(_set_req(1, num_new_tokens=-1)), True),
    Perturbation("float tokens", _requests(_set_req(1, num_new_tokens=2.5)), True),
    Perturbation("string tokens", _requests(_set_req(1, num_computed_tokens="4")), True),
    Perturbation("block ids a string", _requests(_set_req(0, block_ids="30")), True),
    Perturbation("no requests", _requests(lambda reqs, r: []), False),
    Perturbation("not a request", _requests(lambda reqs, r: reqs[:1] + [(0, 4, [5])]), True),
]


def perturbations_for(value) -> list[Perturbation]:
    if isinstance(value, kvl.AttentionMetadata):
        return META_PERTURBATIONS
    if isinstance(value, list) and value and isinstance(value[0], kvl.ScheduledRequest):
        return REQUEST_PERTURBATIONS
    if isinstance(value, torch.Tensor):
        return TENSOR_PERTURBATIONS
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return SCALAR_PERTURBATIONS
    return []


# ------------------------------------------------------------------------------------------ entry points

class Call:
    """A public entry point: ``args(w)`` gives a valid call's arguments, ``run(w, backend, args)`` makes it
    and returns what to compare across backends. ``backend_free`` calls run once, not once per backend."""

    def __init__(self, name, args, run, backend_free=False, backends=BACKENDS, allowed=()):
        self.name, self.args, self.run = name, args, run
        self.backends = ("torch",) if backend_free else backends
        self.allowed = set(allowed)       # (argument, perturbation) pairs that make another valid call


def _impl(backend: str) -> str:
    return "torch" if backend == "torch" else "triton"


def _fwd(w, b, a):
    return get_attention_backend(b).forward(a["q"], a["kv_cache"], a["meta"], a["params"], out=a["out"],
                                            lse=a["lse"], k_scale=a.get("k_scale"), v_scale=a.get("v_scale"))


CALLS = [
    Call("backend.forward", lambda w: dict(q=w.q, kv_cache=w.caches["f32"], meta=w.meta, params=w.params,
                                           out=w.out, lse=w.lse), _fwd),
    Call("backend.forward fp8", lambda w: dict(q=w.q, kv_cache=w.caches["fp8"], meta=w.meta, params=w.params,
                                               out=w.out, lse=w.lse, k_scale=w.scale, v_scale=w.scale), _fwd,
         allowed=[("k_scale", "one row fewer"), ("v_scale", "one row fewer")]),     # one scale per tensor
    Call("backend.write_kv", lambda w: dict(kv_cache=w.caches["fp8"], k=w.k, v=w.v, slots=w.meta.slot_mapping,
                                            k_scale=w.scale, v_scale=w.scale),
         lambda w, b, a: get_attention_backend(b).write_kv(a["kv_cache"], a["k"], a["v"], a["slots"], a["k_scale"],
                                                           a["v_scale"]),
         allowed=[("kv_cache", "one row fewer"), ("k", "other dtype"), ("v", "other dtype"),   # fp8 quantizes any
                  ("k_scale", "one row fewer"), ("v_scale", "one row fewer")]),            # float; per tensor
    Call("kvlayout.write_kv", lambda w: dict(kv_cache=w.caches["f32"], k=w.k, v=w.v, slots=w.meta.slot_mapping),
         lambda w, b, a: kvl.write_kv(a["kv_cache"], a["k"], a["v"], a["slots"]), backend_free=True,
         allowed=[("kv_cache", "one row fewer")]),          # the slots stay inside the smaller cache
    Call("AttentionLayer.attend", lambda w: dict(q=w.q, k=w.k, v=w.v, meta=w.meta, out=w.out),
         lambda w, b, a: w.attn.attend(a["q"], a["k"], a["v"], a["meta"], b, out=a["out"])),
    Call("MLALayer.attend", lambda w: dict(q=w.q_mla, latent=w.latent, meta=w.meta),
         lambda w, b, a: w.mla.attend(a["q"], a["latent"], a["meta"], b), backends=("torch",)),
    Call("MLALayer.write_latent", lambda w: dict(latent=w.latent, slots=w.meta.slot_mapping),
         lambda w, b, a: w.mla.write_latent(a["latent"], a["slots"]), backend_free=True,
         allowed=[("latent", "one row fewer")]),          # slot_mapping may be longer (padding)
    Call("build_attention_metadata", lambda w: dict(requests=w.reqs, block_size=BS, num_blocks=NB),
         lambda w, b, a: kvl.build_attention_metadata(a["requests"], a["block_size"], num_blocks=a["num_blocks"]),
         backend_free=True),
    Call("validate_attention_metadata", lambda w: dict(meta=w.meta),
         lambda w, b, a: validate_attention_metadata(a["meta"]), backend_free=True,
         allowed=[("meta", "dataclasses.replace")]),       # an unchanged copy is what validation is for
    Call("paged_prefill_with_append", lambda w: dict(
        q=w.q, k_new=w.k, v_new=w.v, kv_cache=w.caches["f32"], cu_seqlens_q=w.meta.query_start_loc,
        cache_seqlens=w.meta.seq_lens - torch.diff(w.meta.query_start_loc), block_table=w.meta.block_table,
        out=w.out, lse=w.lse),
         lambda w, b, a: ops.paged_prefill_with_append(**a, impl=_impl(b)),
         allowed=[("kv_cache", "one row fewer")]),
    Call("masked_sequence_prefill", lambda w: dict(q=w.padded[0], k=w.padded[1], v=w.padded[2],
                                                   valid_lens=torch.tensor([5, 2], dtype=torch.int32)),
         lambda w, b, a: ops.masked_sequence_prefill(**a, impl=_impl(b))),
    Call("merge_state", lambda w: dict(v_a=w.state[0], s_a=w.state[1], v_b=w.state_b[0], s_b=w.state_b[1]),
         lambda w, b, a: ops.merge_state(**a, impl=_impl(b))),
    Call("merge_states", lambda w: dict(v=torch.stack([w.state[0], w.state_b[0]], 1),
                                        s=torch.stack([w.state[1], w.state_b[1]], 1)),
         lambda w, b, a: ops.merge_states(**a, impl=_impl(b)), allowed=[("v", "other dtype")]),
    Call("copy_blocks", lambda w: dict(src=torch.tensor([1, 4]), dst=torch.tensor([6, 8])),
         lambda w, b, a: ops.copy_blocks(w.caches, a["src"], a["dst"], impl=_impl(b)),
         allowed=[("src", "a list"), ("dst", "a list")]),
    Call("zero_blocks", lambda w: dict(ids=torch.tensor([1, 4])),
         lambda w, b, a: ops.zero_blocks(w.caches, a["ids"], impl=_impl(b)),
         allowed=[("ids", "a list"), ("ids", "one row fewer")]),
    Call("compact", lambda w: dict(src=torch.tensor([4, 1, 9])),
         lambda w, b, a: ops.compact(w.caches, a["src"], impl=_impl(b)),
         allowed=[("src", "a list"), ("src", "one row fewer")]),
    Call("gather_kv", lambda w: dict(ids=torch.tensor([7, 2]), n=6),
         lambda w, b, a: kvl.gather_kv(w.caches["f32"], a["ids"], a["n"]), backend_free=True,
         allowed=[("ids", "a list")]),
    Call("tree_attention", lambda w: dict(
        q=w.q, k_new=w.k, v_new=w.v, kv_cache=w.caches["f32"], cu_seqlens_q=w.meta.query_start_loc,
        cache_seqlens=w.meta.seq_lens - torch.diff(w.meta.query_start_loc), block_table=w.meta.block_table,
        tree_mask=ops.tree_masks([[-1], [-1, 0, 0, 1], [-1, 0]]), out=w.out, lse=w.lse),
         lambda w, b, a: ops.tree_attention(**a, impl=_impl(b)),
         allowed=[("kv_cache", "one row fewer")]),
    Call("sparse_decode", lambda w: dict(
        q=w.q[:3], kv_cache=w.caches["f32"], block_table=w.meta.block_table, seq_lens=w.meta.seq_lens,
        selected=torch.tensor([[0, 1], [0, -1], [1, -1]], dtype=torch.int32)),
         lambda w, b, a: ops.sparse_decode(**a, impl=_impl(b)),
         allowed=[("kv_cache", "one row fewer"), ("selected", "index -1")]),
    Call("gated_decode", lambda w: dict(
        q=w.q[:3], kv_cache=w.caches["f32"], delta_cache=torch.randn(NB, H, BS, generator=torch.Generator()
                                                                      .manual_seed(1)),
        alpha=torch.randn(3, HQ, generator=torch.Generator().manual_seed(2)), block_table=w.meta.block_table,
        seq_lens=w.meta.seq_lens),
         lambda w, b, a: ops.gated_decode(**a, impl=_impl(b))),
    Call("AttentionParams", lambda w: dict(num_heads=HQ, num_kv_heads=H, head_size=D, scale=0.3, window=3,
                                           cap=30.0),
         lambda w, b, a: kvl.AttentionParams(a["num_heads"], a["num_kv_heads"], a["head_size"], scale=a["scale"],
                                             sliding_window=a["window"], logits_soft_cap=a["cap"]),
         backend_free=True),
]


# ------------------------------------------------------------------------------------------------ runner

def attempt(call: Call, backend: str, key: str, pert: Perturbation, seed: int):
    """Run ``call`` with ``args[key]`` perturbed; returns ``(outcome, result, detail)``: outcome is
    "refused", "accepted", "skip" or "bad"."""
    rng = random.Random(seed)
    w = World()
    args = call.args(w)
    try:
        args[key] = pert.apply(args[key], rng)
    except Skip:
        return "skip", None, ""
    except (dataclasses.FrozenInstanceError, KVLayoutError) as e:   # the edit itself was refused
        return "refused", None, f"edit refused: {e}"
    before = w.snapshot()
    try:
        result = call.run(w, backend, args)
    except KVLayoutError as e:
        if not str(e):
            return "bad", None, "a KVLayoutError without a message"
        if not same_bytes(before, w.snapshot()):
            return "bad", None, f"refused ({e}) but memory changed"
        return "refused", None, str(e)
    except Exception as e:                                          # noqa: BLE001: the point of the test
        return "bad", None, f"{type(e).__name__}: {e}"
    return "accepted", (result, [b.clone() for b in w.caches.buffers]), ""


def _as_tensors(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _as_tensors(r)]
    if hasattr(result, "output"):
        return _as_tensors(tuple(v for v in vars(result).values() if isinstance(v, torch.Tensor)))
    return []


def agree(a, b) -> bool:
    """Two accepted results are the same: outputs close (NaN where the other has NaN), caches equal
    byte for byte where they are not float32 pages, close where they are."""
    ta, tb = _as_tensors(a[0]), _as_tensors(b[0])
    if len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb):
        if x.shape != y.shape or x.device != y.device:
            return False
        if x.dtype.is_floating_point and x.numel() and x.device.type != "meta":
            x, y = x.double(), y.double()
            if not torch.equal(x.isnan(), y.isnan()):
                return False
            x, y = x.nan_to_num(0.0, 0.0, 0.0), y.nan_to_num(0.0, 0.0, 0.0)
            if (x - y).norm() > 1e-4 * max(float(y.norm()), 1e-6):
                return False
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) or
               ((x.view(torch.float32) - y.view(torch.float32)).abs().nan_to_num(0.0) < 1e-4).all()
               for x, y in zip(a[1], b[1]))


# Differences that come from the CPU interpreter, not from kvlayout: the interpreter widens the fp8 e4m3fn
# NaN (0x7F) to 480.0, where the GPU gives NaN (checked: tl.load(x).to(tl.float32) of 0x7F).
INTERPRETER_GAPS = {("backend.forward fp8", "kv_cache", "NaN")}


@pytest.mark.parametrize("call", CALLS, ids=[c.name for c in CALLS])
def test_every_perturbed_call_is_refused_cleanly_or_agrees(call, record_property):
    counts: Counter = Counter()
    problems = []
    w = World()
    for i, (key, pert) in enumerate((k, p) for k, v in call.args(w).items() for p in perturbations_for(v)):
        results = {}
        for backend in call.backends:
            outcome, result, detail = attempt(call, backend, key, pert, SEED + i)
            if outcome == "skip":
                break
            counts[outcome] += 1
            if outcome == "bad":
                problems.append(f"{call.name} [{backend}] {key}: {pert.name}: {detail}")
            elif outcome == "accepted" and pert.must and (key, pert.name) not in call.allowed:
                problems.append(f"{call.name} [{backend}] {key}: {pert.name}: accepted, must be refused")
            results[backend] = (outcome, result)
        if len(results) > 1:
            ref_outcome, ref_result = results["torch"]
            for backend, (outcome, result) in results.items():
                if "bad" in (outcome, ref_outcome):
                    continue
                if outcome != ref_outcome:
                    problems.append(f"{call.name} {key}: {pert.name}: torch {ref_outcome}, {backend} {outcome}")
                elif outcome == "accepted" and not agree(result, ref_result) and not (
                        (call.name, key, pert.name) in INTERPRETER_GAPS and interpreting()):
                    problems.append(f"{call.name} {key}: {pert.name}: {backend} differs from torch")
    print(f"{call.name}: {dict(counts)}")
    record_property("counts", dict(counts))
    assert counts["refused"] + counts["accepted"] > 0
    assert not problems, "\n".join(problems)


def test_the_unperturbed_calls_are_valid():
    """Each template is a valid call on every backend, so a refusal above is due to its perturbation."""
    for call in CALLS:
        for backend in call.backends:
            w = World()
            call.run(w, backend, call.args(w))


@pytest.mark.parametrize("backend", ["triton", "rocm"])
def test_mla_on_a_backend_without_mla_writes_nothing(backend):
    w = World()
    before = w.snapshot()
    with pytest.raises(KVLayoutError, match="MLA"):
        w.mla.attend(w.q_mla, w.latent, w.meta, backend)
    assert same_bytes(before, w.snapshot())


def _ops_inputs(reqs, g):
    """The arguments of ``ops.paged_prefill_with_append`` for the schedule ``reqs`` on a fresh World."""
    w = World()
    t = sum(r.num_new_tokens for r in reqs)
    width = max(len(r.block_ids) for r in reqs)
    table = torch.tensor([list(r.block_ids) + [0] * (width - len(r.block_ids)) for r in reqs], dtype=torch.int32)
    cu = torch.tensor([0] + [sum(r.num_new_tokens for r in reqs[:i + 1]) for i in range(len(reqs))],
                      dtype=torch.int32)
    return w, dict(q=torch.randn(t, HQ, D, generator=g), k_new=torch.randn(t, H, D, generator=g),
                   v_new=torch.randn(t, H, D, generator=g), kv_cache=w.caches["f32"], cu_seqlens_q=cu,
                   cache_seqlens=torch.tensor([r.num_computed_tokens for r in reqs], dtype=torch.int32),
                   block_table=table)


SCHEDULES = {   # name: (requests, shared_block_ids, valid)
    "own blocks": ([(5, 1, [3, 0]), (0, 4, [5]), (4, 2, [7, 2])], None, True),
    "shared prefix, declared": ([(4, 1, [3, 0]), (4, 3, [3, 5])], [3], True),
    "shared prefix, undeclared": ([(4, 1, [3, 0]), (4, 3, [3, 5])], None, False),
    "write into the shared block": ([(3, 1, [3]), (4, 3, [3, 5])], [3], False),
    "one block twice": ([(5, 1, [3, 3])], None, False),
    "two requests write one block": ([(0, 2, [4]), (0, 1, [4])], [4], False),
    "write into another's prefix": ([(5, 1, [3, 0]), (0, 2, [0])], None, False),
    "block out of range": ([(0, 2, [NB])], None, False),
}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_builder_and_paged_prefill_accept_the_same_schedules(name, impl):
    """``build_attention_metadata`` (every backend's entry) and ``ops.paged_prefill_with_append`` hold a
    step to the same rules: both accept it or both refuse it, and a refusal writes nothing."""
    spec, shared, valid = SCHEDULES[name]
    reqs = [kvl.ScheduledRequest(c, n, ids) for c, n, ids in spec]
    try:
        kvl.build_attention_metadata(reqs, BS, num_blocks=NB, shared_block_ids=shared)
        built = True
    except KVLayoutError:
        built = False
    w, args = _ops_inputs(reqs, torch.Generator().manual_seed(7))
    before = w.snapshot()
    try:
        ops.paged_prefill_with_append(**args, impl=impl, shared_block_ids=shared)
        ran = True
    except KVLayoutError:
        ran = False
        assert same_bytes(before, w.snapshot())
    assert built == ran == valid
