"""Tree attention for speculative decoding: each draft sees the cached prefix and its tree ancestors. The
Triton kernel (the CPU interpreter here) and the PyTorch reference agree with a dense float64 oracle on fresh
random trees, with page-boundary prefixes, random page order, GQA and one KV head; bad inputs are refused with
the cache unchanged; the accepted path is moved into place by one page op."""

from __future__ import annotations

import random

import pytest
import torch

import kvlayout as kvl
from kvlayout import ops
from kvlayout.errors import KVLayoutError
from kvlayout.kernels import interpreting
from kvlayout.reference import dense_attention

BS = 4
IMPLS = ["torch"] + (["triton"] if interpreting() or torch.cuda.is_available() else [])


def random_parents(rnd: random.Random, n: int) -> list[int]:
    return [-1 if i == 0 or rnd.random() < 0.2 else rnd.randrange(i) for i in range(n)]


def case(rng, ctxs, drafts, hq, hkv, d=64, dtype=torch.float32, device="cpu"):
    nb = sum(-(-(c + n) // BS) for c, n in zip(ctxs, drafts)) + 3
    kv = torch.randn(nb, hkv, BS, 2 * d, generator=rng).to(device, dtype)
    perm = torch.randperm(nb, generator=rng).tolist()
    width = max(-(-(c + n) // BS) for c, n in zip(ctxs, drafts))
    table = torch.zeros(len(ctxs), width, dtype=torch.int32)
    at = 0
    for r, (c, n) in enumerate(zip(ctxs, drafts)):
        k = -(-(c + n) // BS)
        table[r, :k] = torch.tensor(perm[at:at + k])
        at += k
    t = sum(drafts)
    cu = torch.tensor([0] + list(torch.tensor(drafts).cumsum(0)), dtype=torch.int32)
    q = torch.randn(t, hq, d, generator=rng).to(device, dtype)
    k = torch.randn(t, hkv, d, generator=rng).to(device, dtype)
    v = torch.randn(t, hkv, d, generator=rng).to(device, dtype)
    return kv, table.to(device), torch.tensor(ctxs, dtype=torch.int32, device=device), cu.to(device), q, k, v


def oracle(kv_before, table, ctxs, cu, q, k, v, parents, scale):
    """Dense float64 attention over prefix + ancestors, from the cache before the call and the new K/V."""
    n, d = kv_before.shape[2], q.shape[2]
    outs = []
    for r, c in enumerate(ctxs.tolist()):
        q0, q1 = int(cu[r]), int(cu[r + 1])
        pos = torch.arange(c)
        pre = kv_before[table[r].long()[pos // n], :, pos % n].double()
        keys = torch.cat([pre[..., :d], k[q0:q1].double()])
        vals = torch.cat([pre[..., d:], v[q0:q1].double()])
        nd = q1 - q0
        anc = torch.zeros(nd, nd, dtype=torch.bool)
        for i, p in enumerate(parents[r]):
            anc[i] = anc[p] if p >= 0 else False
            anc[i, i] = True
        seen = torch.cat([torch.ones(nd, c, dtype=torch.bool), anc], dim=1)
        o, _ = dense_attention(q[q0:q1].double(), keys, vals, scale, q_offset=c, causal=False, key_mask=seen)
        outs.append(o)
    return torch.cat(outs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ctxs, drafts, hq, hkv", [
    ([7, 16, 3], [5, 8, 1], 4, 2),          # page-boundary prefix, one draft
    ([0, 12], [6, 13], 4, 1),               # no prefix, num_kv_heads == 1
    ([33], [20], 8, 8),                     # MHA, a deep tree over several pages
])
def test_tree_attention_matches_the_oracle(rng, impl, ctxs, drafts, hq, hkv):
    rnd = random.Random(int(torch.randint(1 << 30, (1,), generator=rng)))
    parents = [random_parents(rnd, n) for n in drafts]
    kv, table, lens, cu, q, k, v = case(rng, ctxs, drafts, hq, hkv)
    before = kv.clone()
    masks = ops.tree_masks(parents)
    out = torch.full_like(q, float("nan"))
    out, lse = ops.tree_attention(q, k, v, kv, cu, lens, table, masks, out=out, return_lse=True, impl=impl)
    want = oracle(before, table, lens, cu, q, k, v, parents, 64 ** -0.5)
    assert float((out.double() - want).norm() / want.norm()) < 1e-4
    assert torch.isfinite(lse).all()
    ref_out, ref_lse = ops.tree_attention(q, k, v, before.clone(), cu, lens, table, masks, return_lse=True,
                                          impl="torch")
    assert torch.allclose(lse, ref_lse, atol=1e-4)
    # the drafts were appended at ctx + i, nothing else changed
    n = kv.shape[2]
    for r, c in enumerate(ctxs):
        for i in range(drafts[r]):
            p = c + i
            blk, off = int(table[r, p // n]), p % n
            assert torch.equal(kv[blk, :, off, :64], k[int(cu[r]) + i])
            before[blk, :, off, :64], before[blk, :, off, 64:] = k[int(cu[r]) + i], v[int(cu[r]) + i]
    assert torch.equal(kv, before)


def test_a_chain_is_causal_attention(rng):
    kv, table, lens, cu, q, k, v = case(rng, [9], [6], 4, 2)
    kv2 = kv.clone()
    chain = ops.tree_masks([list(range(-1, 5))])
    got = ops.tree_attention(q, k, v, kv, cu, lens, table, chain, impl="torch")
    want = ops.paged_prefill_with_append(q, k, v, kv2, cu, lens, table, impl="torch")
    assert torch.allclose(got, want, atol=1e-6)


def test_the_worked_example_masks():
    assert ops.tree_masks([[-1, 0, 0, 1]]).tolist() == [0b0001, 0b0011, 0b0101, 0b1011]
    deep = ops.tree_masks([list(range(-1, 63))])
    assert int(deep[-1]) == -1                            # all 64 bits: bit 63 is the sign bit


@pytest.mark.parametrize("parents, match", [
    ([[0]], "parent must be -1"),
    ([[-1, 1]], "parent must be -1"),
    ([[-1, 0.5]], "parent must be -1"),
    ([[-1] * 65], "at most 64"),
])
def test_bad_trees_are_refused(parents, match):
    with pytest.raises(KVLayoutError, match=match):
        ops.tree_masks(parents)


@pytest.mark.parametrize("edit, match", [
    (lambda a: a.update(tree_mask=a["tree_mask"] & ~1), "own bit"),
    (lambda a: a.update(tree_mask=a["tree_mask"] | 4), "later draft"),
    (lambda a: a.update(tree_mask=a["tree_mask"][:-1]), "tree_mask must be int64"),
    (lambda a: a.update(tree_mask=a["tree_mask"].int()), "tree_mask must be int64"),
    (lambda a: a.update(q=a["q"][:, :3]), "heads"),
    (lambda a: a.update(block_table=a["block_table"].clone().fill_(0)), "twice"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"] + 30), "blocks"),
])
def test_bad_calls_are_refused_before_any_write(rng, edit, match):
    kv, table, lens, cu, q, k, v = case(rng, [5, 8], [3, 4], 4, 2)
    args = dict(q=q, k_new=k, v_new=v, kv_cache=kv, cu_seqlens_q=cu, cache_seqlens=lens, block_table=table,
                tree_mask=ops.tree_masks([[-1, 0, 0], [-1, 0, 1, 1]]))
    edit(args)
    before = kv.clone()
    with pytest.raises(KVLayoutError, match=match):
        ops.tree_attention(**args)
    assert torch.equal(kv, before)


def test_accept_drafts_moves_the_path_into_place(rng):
    kv, table, lens, cu, q, k, v = case(rng, [6, 3], [5, 4], 4, 2)
    ops.tree_attention(q, k, v, kv, cu, lens, table, ops.tree_masks([[-1, 0, 1, 0, 3], [-1, 0, 0, 2]]), impl="torch")
    before = kv.clone()
    accepted = [[0, 3, 4], [2]]
    ops.accept_drafts(kv, table, lens, accepted)
    n = kv.shape[2]

    def at(r, p):
        return int(table[r, p // n]), p % n
    for r, acc in enumerate(accepted):
        c = int(lens[r])
        for i, a in enumerate(acc):
            assert torch.equal(kv[at(r, c + i)[0], :, at(r, c + i)[1]], before[at(r, c + a)[0], :, at(r, c + a)[1]])
    with pytest.raises(KVLayoutError, match="increasing"):
        ops.accept_drafts(kv, table, lens, [[3, 1], []])
    with pytest.raises(KVLayoutError, match="past its"):
        ops.accept_drafts(kv, table, lens, [[40], []])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq, hkv, d", [(32, 8, 128), (8, 1, 64), (16, 16, 256)])
def test_gpu_tree_attention_matches_the_reference(rng, dtype, hq, hkv, d):
    rnd = random.Random(int(torch.randint(1 << 30, (1,), generator=rng)))
    ctxs, drafts = [0, 15, 16, 300], [1, 17, 64, 40]
    parents = [random_parents(rnd, n) for n in drafts]
    kv, table, lens, cu, q, k, v = case(rng, ctxs, drafts, hq, hkv, d, dtype, "cuda")
    masks = ops.tree_masks(parents, "cuda")
    ref_kv = kv.clone()
    out = ops.tree_attention(q, k, v, kv, cu, lens, table, masks, impl="triton")
    want = ops.tree_attention(q, k, v, ref_kv, cu, lens, table, masks, impl="torch")
    assert torch.equal(kv, ref_kv)
    assert float((out.float() - want.float()).norm() / want.float().norm()) < 1e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_tree_attention_matches_the_reference_path(rng, impl, per_head):
    rnd = random.Random(int(torch.randint(1 << 30, (1,), generator=rng)))
    ctxs, drafts = [5, 8], [4, 7]
    parents = [random_parents(rnd, n) for n in drafts]
    kv, table, lens, cu, q, k, v = case(rng, ctxs, drafts, 4, 2)
    scales = (torch.tensor([0.5, 0.25]), torch.tensor([2.0, 1.0])) if per_head else (torch.tensor([0.5]),
                                                                                        torch.tensor([2.0]))
    cache = torch.zeros(kv.shape, dtype=torch.float8_e4m3fn)
    kvl.write_kv(cache, kv.transpose(1, 2).reshape(-1, 2, 128)[:, :, :64].contiguous(),
                 kv.transpose(1, 2).reshape(-1, 2, 128)[:, :, 64:].contiguous(),
                 torch.arange(kv.shape[0] * BS), *scales)
    deq_k, deq_v = kvl.gather_kv(cache, list(range(kv.shape[0])), kv.shape[0] * BS, *scales)
    ref = torch.cat([deq_k, deq_v], dim=-1).reshape(kv.shape[0], BS, 2, 128).transpose(1, 2).contiguous()
    masks = ops.tree_masks(parents)
    out = ops.tree_attention(q, k, v, cache, cu, lens, table, masks, k_scale=scales[0], v_scale=scales[1], impl=impl)
    # the oracle sees the dequantized prefix and the drafts as quantized and dequantized by the write
    dk, dv = [], []
    for r in range(2):
        kk, vv = kvl.gather_kv(cache, table[r].tolist()[: -(-(ctxs[r] + drafts[r]) // BS)], ctxs[r] + drafts[r],
                               *scales)
        dk.append(kk[ctxs[r]:])
        dv.append(vv[ctxs[r]:])
    want = oracle(ref, table, lens, cu, q, torch.cat(dk), torch.cat(dv), parents, 64 ** -0.5)
    assert float((out.double() - want).norm() / want.norm()) < 1e-4
