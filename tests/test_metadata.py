"""Per-step attention metadata, checked against a plain Python construction."""

import pytest
import torch

import kvlayout as kvl
from kvlayout.errors import KVLayoutError

BS, NB = 4, 64


def random_requests(rng, n, decodes=0, max_computed=20, max_new=9, num_blocks=NB):
    """``decodes`` one-token requests first, then prefills; block ids drawn without repeats, in random order."""
    pool = torch.randperm(num_blocks, generator=rng).tolist()
    reqs = []
    for i in range(n):
        computed = int(torch.randint(0, max_computed + 1, (1,), generator=rng))
        new = 1 if i < decodes else int(torch.randint(0, max_new + 1, (1,), generator=rng))
        need = -(-(computed + new) // BS)
        extra = int(torch.randint(0, 2, (1,), generator=rng))       # sometimes more ids than needed
        ids = [pool.pop() for _ in range(need + extra)]
        reqs.append(kvl.ScheduledRequest(computed, new, ids))
    return reqs


def reference(reqs, width):
    qsl, seqs, table, slots = [0], [], [], []
    for r in reqs:
        qsl.append(qsl[-1] + r.num_new_tokens)
        seqs.append(r.num_computed_tokens + r.num_new_tokens)
        need = -(-seqs[-1] // BS)
        table.append(list(r.block_ids[:need]) + [0] * (width - need))
        for pos in range(r.num_computed_tokens, seqs[-1]):
            slots.append(r.block_ids[pos // BS] * BS + pos % BS)
    return qsl, seqs, table, slots


@pytest.mark.parametrize("n,decodes", [(1, 0), (1, 1), (5, 0), (6, 3), (4, 4)])
def test_metadata_matches_reference(n, decodes, rng):
    reqs = random_requests(rng, n, decodes)
    meta = kvl.build_attention_metadata(reqs, BS, num_blocks=NB)
    width = max(1, max(-(-(r.num_computed_tokens + r.num_new_tokens) // BS) for r in reqs))
    qsl, seqs, table, slots = reference(reqs, width)
    assert meta.query_start_loc.dtype == torch.int32 and meta.query_start_loc.tolist() == qsl
    assert meta.seq_lens.dtype == torch.int32 and meta.seq_lens.tolist() == seqs
    assert meta.block_table.dtype == torch.int32 and meta.block_table.tolist() == table
    assert meta.slot_mapping.dtype == torch.int64 and meta.slot_mapping.tolist() == slots
    assert meta.query_start_loc_cpu.tolist() == qsl and meta.seq_lens_cpu.tolist() == seqs
    assert meta.query_start_loc_cpu.device.type == "cpu"
    assert meta.max_query_len == max(r.num_new_tokens for r in reqs)
    assert meta.max_seq_len == max(seqs)
    assert meta.num_actual_tokens == qsl[-1] == len(slots)
    lead = 0
    while lead < n and reqs[lead].num_new_tokens == 1:
        lead += 1
    assert meta.num_decodes == meta.num_decode_tokens == lead >= decodes
    assert meta.num_prefills == n - lead and meta.num_prefill_tokens == qsl[-1] - lead
    assert meta.num_reqs == n and meta.block_size == BS and meta.num_blocks == NB
    assert len(set(slots)) == len(slots)                             # distinct blocks: distinct slots


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("n,decodes", [(1, 1), (3, 0), (7, 2)])
def test_metadata_tensors_share_one_aligned_buffer(n, decodes, device, rng):
    """The step's tensors are views of one buffer (one copy to the device): each starts on a 16-byte
    boundary, none overlaps another, and an edit of any of them turns the seal off."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    reqs = random_requests(rng, n, decodes)
    meta = kvl.build_attention_metadata(reqs, BS, device, num_blocks=NB, pad_tokens_to=sum(
        r.num_new_tokens for r in reqs) + 3)
    width = max(1, max(-(-(r.num_computed_tokens + r.num_new_tokens) // BS) for r in reqs))
    qsl, seqs, table, slots = reference(reqs, width)
    assert meta.slot_mapping.tolist() == slots + [-1] * 3 and meta.block_table.tolist() == table
    assert meta.query_start_loc.tolist() == qsl and meta.seq_lens.tolist() == seqs
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                   for t in (meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_table))
    assert all(lo % 16 == 0 for lo, _ in spans) and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert all(t.is_contiguous() for t in (meta.slot_mapping, meta.block_table, meta.query_start_loc_cpu))
    for name in ("slot_mapping", "seq_lens", "block_table", "query_start_loc_cpu"):
        fresh = kvl.build_attention_metadata(reqs, BS, device, num_blocks=NB)
        getattr(fresh, name).add_(0)
        assert not fresh.is_validated, name


def test_page_boundaries_and_chunked_prefill():
    reqs = [kvl.ScheduledRequest(BS - 1, 1, [7]),                     # decode filling the last slot of block 7
            kvl.ScheduledRequest(BS, 1, [3, 9]),                      # decode opening a new block
            kvl.ScheduledRequest(2 * BS - 2, 4, [5, 1, 8]),           # chunk crossing a boundary
            kvl.ScheduledRequest(0, 0, []),                           # nothing scheduled
            kvl.ScheduledRequest(0, 2 * BS, [2, 0])]                  # prompt of exactly two blocks
    meta = kvl.build_attention_metadata(reqs, BS, num_blocks=10)
    assert meta.slot_mapping.tolist() == [7 * BS + BS - 1, 9 * BS + 0,
                                          1 * BS + 2, 1 * BS + 3, 8 * BS + 0, 8 * BS + 1,
                                          2 * BS, 2 * BS + 1, 2 * BS + 2, 2 * BS + 3, 0, 1, 2, 3]
    assert meta.seq_lens.tolist() == [BS, BS + 1, 2 * BS + 2, 0, 2 * BS]
    assert meta.query_start_loc.tolist() == [0, 1, 2, 6, 6, 14]
    assert meta.block_table.tolist() == [[7, 0, 0], [3, 9, 0], [5, 1, 8], [0, 0, 0], [2, 0, 0]]
    assert meta.num_decodes == 2 and meta.max_query_len == 2 * BS


def test_fixed_width_and_padding():
    reqs = [kvl.ScheduledRequest(0, 3, [4]), kvl.ScheduledRequest(2, 1, [6])]
    meta = kvl.build_attention_metadata(reqs, BS, num_blocks=NB, max_blocks_per_request=5, pad_tokens_to=8)
    assert tuple(meta.block_table.shape) == (2, 5)
    assert meta.slot_mapping.tolist() == [16, 17, 18, 26, -1, -1, -1, -1]
    assert meta.num_actual_tokens == 4 and meta.num_decodes == 0


def test_empty_step():
    meta = kvl.build_attention_metadata([], BS, num_blocks=NB)
    assert meta.num_reqs == 0 and meta.num_actual_tokens == 0 and meta.slot_mapping.numel() == 0
    assert meta.query_start_loc.tolist() == [0] and meta.max_seq_len == 0


def test_from_plan_uses_its_token_group():
    plan = kvl.plan_kv_cache({"a": kvl.AttentionSpec(2, 8, torch.float32, 8)}, 64 * 1024)
    meta = kvl.build_attention_metadata([kvl.ScheduledRequest(0, 9, [3, 1])], plan)
    g = plan.groups[0]
    assert meta.block_size == 8 and meta.num_blocks == g.num_blocks == 64
    assert meta.slot_mapping.tolist() == list(range(24, 32)) + [8]
    two = kvl.plan_kv_cache({"a": kvl.AttentionSpec(2, 8), "b": kvl.AttentionSpec(4, 8)}, 1 << 20)
    with pytest.raises(KVLayoutError, match="2 token-indexed groups"):
        kvl.build_attention_metadata([], two)


def test_order_decodes_first():
    reqs = [kvl.ScheduledRequest(0, 5, []), kvl.ScheduledRequest(3, 1, []), kvl.ScheduledRequest(0, 0, []),
            kvl.ScheduledRequest(9, 1, [])]
    assert kvl.order_decodes_first(reqs) == [1, 3, 0, 2]


@pytest.mark.parametrize("reqs,kw,match", [
    ([kvl.ScheduledRequest(0, 5, [1])], {}, "need 2 blocks of 4, but it has 1"),
    ([kvl.ScheduledRequest(0, 3, [NB])], {}, f"block id {NB} is out of range"),
    ([kvl.ScheduledRequest(0, 3, [-1])], {}, "block id -1 is out of range"),
    ([kvl.ScheduledRequest(-1, 3, [0])], {}, "token counts must be >= 0"),
    ([kvl.ScheduledRequest(0, -2, [0])], {}, "token counts must be >= 0"),
    ([kvl.ScheduledRequest(0, 5, [0, 1])], {"max_blocks_per_request": 1}, "less than the 2 blocks"),
    ([kvl.ScheduledRequest(0, 5, [0, 1])], {"max_blocks_per_request": NB + 1}, "longer than the cache"),
    ([kvl.ScheduledRequest(0, BS * (NB + 1), list(range(NB)) * 2)], {}, "longer than the cache"),
    ([kvl.ScheduledRequest(0, 5, [0, 1])], {"pad_tokens_to": 4}, "less than the 5 scheduled tokens"),
])
def test_bad_requests(reqs, kw, match):
    with pytest.raises(KVLayoutError, match=match):
        kvl.build_attention_metadata(reqs, BS, num_blocks=NB, **kw)


def test_bare_block_size_needs_num_blocks():
    with pytest.raises(KVLayoutError, match="pass num_blocks"):
        kvl.build_attention_metadata([], BS)
    with pytest.raises(KVLayoutError, match="block size must be a positive integer"):
        kvl.build_attention_metadata([], 0, num_blocks=4)
