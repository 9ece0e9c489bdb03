"""Gated decode: scores ``scale * (q.k + G(alpha * delta))`` with per-key gates in a companion paged tensor.
Triton (the interpreter here) and the PyTorch path agree with a float64 oracle, with GQA, one KV head,
page-boundary lengths, random page order and an empty request; a zero gate with the linear form is plain
decode; bad inputs are refused with nothing written."""

from __future__ import annotations

import pytest
import torch

import kvlayout as kvl
from kvlayout import ops
from kvlayout.errors import KVLayoutError
from kvlayout.kernels import interpreting

BS = 4
IMPLS = ["torch"] + (["triton"] if interpreting() or torch.cuda.is_available() else [])


def case(rng, lens, hq, hkv, d=64, dtype=torch.float32, device="cpu"):
    pages = [-(-n // BS) for n in lens]
    nb = sum(pages) + 2
    kv = torch.randn(nb, hkv, BS, 2 * d, generator=rng).to(device, dtype)
    delta = (2 * torch.randn(nb, hkv, BS, generator=rng)).to(device)
    perm = torch.randperm(nb, generator=rng).tolist()
    table = torch.zeros(len(lens), max(pages + [1]), dtype=torch.int32)
    at = 0
    for r, p in enumerate(pages):
        table[r, :p] = torch.tensor(perm[at:at + p], dtype=torch.int32)
        at += p
    q = torch.randn(len(lens), hq, d, generator=rng).to(device, dtype)
    alpha = torch.randn(len(lens), hq, generator=rng).to(device)
    return kv, delta, alpha, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device), q


def oracle(kv, delta, alpha, table, lens, q, scale, logsigmoid):
    d, hq, hkv = q.shape[2], q.shape[1], kv.shape[1]
    outs = []
    for r, n in enumerate(lens.tolist()):
        if n == 0:
            outs.append(torch.zeros(hq, d, dtype=torch.float64))
            continue
        pos = torch.arange(n)
        blk = table[r].long()[pos // BS]
        k = kv[blk, :, pos % BS].double().repeat_interleave(hq // hkv, 1)
        g = alpha[r].double()[None, :] * delta[blk, :, pos % BS].double().repeat_interleave(hq // hkv, 1)
        if logsigmoid:
            g = torch.nn.functional.logsigmoid(g)
        s = (torch.einsum("hd,shd->hs", q[r].double(), k[..., :d]) + g.T) * scale
        outs.append(torch.einsum("hs,shd->hd", torch.softmax(s, -1), k[..., d:]))
    return torch.stack(outs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gate", ["logsigmoid", "linear"])
@pytest.mark.parametrize("lens, hq, hkv", [([10, 16, 1, 33], 4, 2), ([40, 0], 4, 1), ([7], 8, 8)])
def test_gated_decode_matches_the_oracle(rng, impl, gate, lens, hq, hkv):
    kv, delta, alpha, table, seq, q = case(rng, lens, hq, hkv)
    out = torch.full_like(q, float("nan"))
    out, lse = ops.gated_decode(q, kv, delta, alpha, table, seq, gate=gate, out=out, return_lse=True, impl=impl)
    want = oracle(kv, delta, alpha, table, seq, q, 64 ** -0.5, gate == "logsigmoid")
    assert float((out.double() - want).norm() / want.norm()) < 1e-4
    empty = seq == 0
    assert torch.isinf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()


def test_a_zero_linear_gate_is_plain_decode(rng):
    kv, delta, alpha, table, seq, q = case(rng, [9, 12], 4, 2)
    got = ops.gated_decode(q, kv, torch.zeros_like(delta), alpha, table, seq, gate="linear", impl="torch")
    meta = kvl.build_attention_metadata([kvl.ScheduledRequest(8, 1, table[0, :3].tolist()),
                                         kvl.ScheduledRequest(11, 1, table[1, :3].tolist())], BS,
                                        num_blocks=kv.shape[0])
    want = kvl.get_attention_backend("torch").forward(q, kv, meta, kvl.AttentionParams(4, 2, 64))
    assert torch.allclose(got, want, atol=1e-6)


def test_write_gates_writes_the_slots_and_refuses_repeats(rng):
    delta = torch.zeros(4, 2, BS)
    ops.write_gates(delta, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([5, -1]))
    assert delta[1, :, 1].tolist() == [1.0, 2.0] and int((delta != 0).sum()) == 2
    before = delta.clone()
    with pytest.raises(KVLayoutError, match="more than one token"):
        ops.write_gates(delta, torch.ones(2, 2), torch.tensor([3, 3]))
    with pytest.raises(KVLayoutError, match="float32"):
        ops.write_gates(delta, torch.ones(2, 2, dtype=torch.float64), torch.tensor([3, 4]))
    assert torch.equal(delta, before)


@pytest.mark.parametrize("edit, match", [
    (lambda a: a.update(gate="relu"), "gate must be"),
    (lambda a: a.update(alpha=a["alpha"][:, :3]), "alpha must be"),
    (lambda a: a.update(delta_cache=a["delta_cache"].double()), "delta_cache must be"),
    (lambda a: a.update(seq_lens=a["seq_lens"] + 20), "pages"),
    (lambda a: a.update(block_table=a["block_table"] + 100), "outside"),
    (lambda a: a.update(q=a["q"][:, :3]), "heads"),
])
def test_bad_calls_are_refused(rng, edit, match):
    kv, delta, alpha, table, seq, q = case(rng, [9, 5], 4, 2)
    args = dict(q=q, kv_cache=kv, delta_cache=delta, alpha=alpha, block_table=table, seq_lens=seq)
    edit(args)
    out = torch.full_like(q, 7.0)
    with pytest.raises(KVLayoutError, match=match):
        ops.gated_decode(**args, out=out if args["q"] is q else None)
    assert (out == 7.0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gated_decode_matches_the_reference(rng, dtype):
    lens = [4096, 17, 1, 300]
    kv, delta, alpha, table, seq, q = case(rng, lens, 32, 8, 128, dtype, "cuda")
    out = ops.gated_decode(q, kv, delta, alpha, table, seq, impl="triton")
    want = ops.gated_decode(q, kv, delta, alpha, table, seq, impl="torch")
    assert float((out.float() - want.float()).norm() / want.float().norm()) < 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_split_keys_merge_to_the_same_result(rng, impl):
    kv, delta, alpha, table, seq, q = case(rng, [1300, 37], 4, 1)          # long enough for split-KV
    out = ops.gated_decode(q, kv, delta, alpha, table, seq, impl=impl)
    want = oracle(kv, delta, alpha, table, seq, q, 64 ** -0.5, True)
    assert float((out.double() - want).norm() / want.norm()) < 1e-4
    if impl == "triton":
        from kvlayout.kernels.gated import gated_decode_launch
        for splits in (1, 3, 7):
            o = torch.full_like(q, float("nan"))
            lse = torch.empty(q.shape[:2])
            gated_decode_launch(q, kv, delta, alpha, table, seq, o, lse, scale=64 ** -0.5, logsigmoid=True,
                                max_seq_len=1300, num_splits=splits)
            assert float((o.double() - want).norm() / want.norm()) < 1e-4 and torch.isfinite(lse).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_gated_decode_matches_the_dequantized_oracle(rng, impl, per_head):
    kv, delta, alpha, table, seq, q = case(rng, [10, 21], 4, 2)
    scale_k = torch.tensor([0.5, 0.25] if per_head else [0.5])
    scale_v = torch.tensor([2.0, 1.0] if per_head else [2.0])
    sk = scale_k.view(1, -1, 1, 1) if per_head else scale_k
    sv = scale_v.view(1, -1, 1, 1) if per_head else scale_v
    quant = torch.empty(kv.shape, dtype=torch.float8_e4m3fn)
    quant[..., :64] = (kv[..., :64] / sk).to(torch.float8_e4m3fn)
    quant[..., 64:] = (kv[..., 64:] / sv).to(torch.float8_e4m3fn)
    deq = torch.cat([quant[..., :64].float() * sk, quant[..., 64:].float() * sv], dim=-1)
    out = ops.gated_decode(q, quant, delta, alpha, table, seq, k_scale=scale_k, v_scale=scale_v, impl=impl)
    want = oracle(deq, delta, alpha, table, seq, q, 64 ** -0.5, True)
    assert float((out.double() - want).norm() / want.norm()) < 1e-4
