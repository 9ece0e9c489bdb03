"""Block-sparse decode: a request attends to the keys of the pages it selected (its last page only up to
its length). Triton (the split-KV decode kernel over the selected pages; the interpreter here) and the
PyTorch path agree with a dense float64 oracle; selecting every page is plain decode; bad selections are
refused."""

from __future__ import annotations

import pytest
import torch

import kvlayout as kvl
from kvlayout import ops
from kvlayout.errors import KVLayoutError
from kvlayout.kernels import interpreting
from kvlayout.reference import dense_attention
from kvlayout.sparse_decode import selected_pages

BS = 4
IMPLS = ["torch"] + (["triton"] if interpreting() or torch.cuda.is_available() else [])


def case(rng, lens, hq, hkv, d=64, dtype=torch.float32, device="cpu"):
    pages = [-(-n // BS) for n in lens]
    nb = sum(pages) + 2
    kv = torch.randn(nb, hkv, BS, 2 * d, generator=rng).to(device, dtype)
    perm = torch.randperm(nb, generator=rng).tolist()
    table = torch.zeros(len(lens), max(pages + [1]), dtype=torch.int32)
    at = 0
    for r, p in enumerate(pages):
        table[r, :p] = torch.tensor(perm[at:at + p], dtype=torch.int32)
        at += p
    q = torch.randn(len(lens), hq, d, generator=rng).to(device, dtype)
    return kv, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device), q


def random_selection(rng, lens, width):
    rows = []
    for n in lens:
        p = -(-n // BS)
        k = int(torch.randint(0, p + 1, (1,), generator=rng)) if p else 0
        pick = sorted(torch.randperm(p, generator=rng)[:k].tolist()) if p else []
        rows.append(pick + [-1] * (width - len(pick)))
    return torch.tensor(rows, dtype=torch.int32)


def oracle(kv, table, lens, sel, q, scale):
    d = q.shape[2]
    outs = []
    for r, n in enumerate(lens.tolist()):
        pos = [p for i in sel[r].tolist() if i >= 0 for p in range(i * BS, min(i * BS + BS, n))]
        if not pos:
            outs.append(torch.zeros(q.shape[1], d, dtype=torch.float64))
            continue
        pos = torch.tensor(pos)
        k = kv[table[r].long()[pos // BS], :, pos % BS].double()
        o, _ = dense_attention(q[r:r + 1].double(), k[..., :d], k[..., d:], scale, q_offset=n - 1, causal=False)
        outs.append(o[0])
    return torch.stack(outs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lens, hq, hkv", [([10, 16, 1, 33], 4, 2), ([40, 7], 4, 1), ([64, 0, 5], 8, 8)])
def test_sparse_decode_matches_the_oracle(rng, impl, lens, hq, hkv):
    kv, table, seq, q = case(rng, lens, hq, hkv)
    sel = random_selection(rng, lens, table.shape[1] + 1)
    before = kv.clone()
    out = torch.full_like(q, float("nan"))
    out, lse = ops.sparse_decode(q, kv, table, seq, sel, out=out, return_lse=True, impl=impl)
    want = oracle(kv, table, seq, sel, q, 64 ** -0.5)
    assert float((out.double() - want).norm() / max(float(want.norm()), 1e-30)) < 1e-4
    empty = (sel >= 0).sum(1) == 0
    assert torch.isinf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    assert torch.equal(kv, before)


def test_the_worked_example_and_every_page_is_plain_decode(rng):
    kv, table, seq, q = case(rng, [10, 13], 4, 2)
    sel = torch.tensor([[0, 2, -1, -1], [1, 3, -1, -1]])
    pages, lens = selected_pages(table, seq, sel, BS)
    assert lens.tolist() == [6, 5]
    assert pages.dtype == torch.int32 and pages[:, :2].tolist() == [[table[0, 0], table[0, 2]], [table[1, 1], table[1, 3]]]
    for _ in range(20):                                   # against a count of the positions each one sees
        lens_r = torch.randint(1, 4 * BS + 1, (3,), generator=rng)
        sel = torch.full((3, 4), -1)
        for r, n in enumerate(lens_r.tolist()):
            k = int(torch.randint(0, -(-n // BS) + 1, (1,), generator=rng))
            sel[r, :k] = torch.sort(torch.randperm(-(-n // BS), generator=rng)[:k]).values
        _, got = selected_pages(table[:1].expand(3, -1), lens_r.to(torch.int32), sel, BS)
        want = [sum(1 for p in range(n) if p // BS in sel[r].tolist()) for r, n in enumerate(lens_r.tolist())]
        assert got.tolist() == want
    full = torch.tensor([[0, 1, 2, -1], [0, 1, 2, 3]], dtype=torch.int32)
    got = ops.sparse_decode(q, kv, table, seq, full, impl="torch")
    meta = kvl.build_attention_metadata([kvl.ScheduledRequest(9, 1, table[0, :3].tolist()),
                                         kvl.ScheduledRequest(12, 1, table[1, :4].tolist())], BS,
                                        num_blocks=kv.shape[0])
    want = kvl.get_attention_backend("torch").forward(q, kv, meta, kvl.AttentionParams(4, 2, 64))
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.skipif("triton" not in IMPLS, reason="needs the Triton interpreter or a GPU")
def test_the_one_launch_page_table_equals_the_torch_form(rng):
    from kvlayout.kernels.sparse import selected_pages_launch
    for lens, width in (([10, 16, 1, 33, 0], 10), ([5] * 3, 3), ([4 * BS * 300 + 1], 1202)):
        kv, table, seq, q = case(rng, lens, 2, 1)
        sel = random_selection(rng, lens, width)
        sel[-1, 0] = 0 if lens[-1] else -1                    # one row with its first page selected
        for t in (table, table.t().contiguous().t()):         # row-major and column-major block tables
            got_table, got_lens, rows = selected_pages_launch(t, seq, sel, BS)
            want_table, want_lens = selected_pages(t, seq, sel, BS)
            valid = sel >= 0
            assert torch.equal(got_table[valid], want_table[valid]) and torch.equal(got_lens, want_lens)
            assert rows.tolist() == list(range(len(lens) + 1))
    empty = selected_pages_launch(table[:0], seq[:0], sel[:0], BS)
    assert empty[0].shape == (0, sel.shape[1]) and empty[2].tolist() == [0]


@pytest.mark.parametrize("sel, match", [
    ([[0, -1, 1], [0, -1, -1]], "padded only at the end"),
    ([[1, 0, -1], [0, -1, -1]], "increase"),
    ([[0, 0, -1], [0, -1, -1]], "increase"),
    ([[3, -1, -1], [0, -1, -1]], "past its"),
    ([[-2, -1, -1], [0, -1, -1]], ">= 0"),
])
def test_bad_selections_are_refused(rng, sel, match):
    kv, table, seq, q = case(rng, [10, 3], 4, 2)
    with pytest.raises(KVLayoutError, match=match):
        ops.sparse_decode(q, kv, table, seq, torch.tensor(sel, dtype=torch.int32))


def test_bad_shapes_are_refused(rng):
    kv, table, seq, q = case(rng, [10, 3], 4, 2)
    sel = torch.tensor([[0, -1, -1], [0, -1, -1]], dtype=torch.int32)
    with pytest.raises(KVLayoutError, match="requests"):
        ops.sparse_decode(q[:1], kv, table, seq, sel)
    with pytest.raises(KVLayoutError, match="heads"):
        ops.sparse_decode(q[:, :3], kv, table, seq, sel)
    with pytest.raises(KVLayoutError, match="pages"):
        ops.sparse_decode(q, kv, table[:, :1], seq, sel)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_sparse_decode_matches_the_reference(rng, dtype):
    lens = [4096, 17, 1, 65536]
    kv, table, seq, q = case(rng, lens, 32, 8, 128, dtype, "cuda")
    sel = random_selection(rng, lens, table.shape[1]).cuda()
    out = ops.sparse_decode(q, kv, table, seq, sel, impl="triton")
    want = ops.sparse_decode(q, kv, table, seq, sel, impl="torch")
    assert float((out.float() - want.float()).norm() / want.float().norm()) < 1e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_sparse_decode_matches_the_dequantized_oracle(rng, impl, per_head):
    lens = [10, 21]
    kv, table, seq, q = case(rng, lens, 4, 2)
    scale_k = torch.tensor([0.5, 0.25] if per_head else [0.5])
    scale_v = torch.tensor([2.0, 1.0] if per_head else [2.0])
    quant = torch.empty(kv.shape, dtype=torch.float8_e4m3fn)
    sk = scale_k.view(1, -1, 1, 1) if per_head else scale_k
    sv = scale_v.view(1, -1, 1, 1) if per_head else scale_v
    quant[..., :64] = (kv[..., :64] / sk).to(torch.float8_e4m3fn)
    quant[..., 64:] = (kv[..., 64:] / sv).to(torch.float8_e4m3fn)
    deq = torch.cat([quant[..., :64].float() * sk, quant[..., 64:].float() * sv], dim=-1)
    sel = random_selection(rng, lens, table.shape[1])
    out = ops.sparse_decode(q, quant, table, seq, sel, k_scale=scale_k, v_scale=scale_v, impl=impl)
    want = oracle(deq, table, seq, sel, q, 64 ** -0.5)
    assert float((out.double() - want).norm() / max(float(want.norm()), 1e-30)) < 1e-4
    with pytest.raises(KVLayoutError, match="only for fp8"):
        ops.sparse_decode(q, kv, table, seq, sel, k_scale=scale_k, v_scale=scale_v)
