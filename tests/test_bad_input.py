"""Every bad input of the core raises a clear KVLayoutError before any memory is touched: the cache
buffers (and any out/lse buffer passed in) are byte-identical after the rejected call."""

import pytest
import torch

import kvlayout as kvl
from kvlayout.backends.torch_ref import TorchBackend
from kvlayout.errors import KVLayoutError

H, HQ, D, BS, NB = 2, 4, 8, 4, 6
TORCH = TorchBackend()


class Attn(kvl.AttentionLayer, torch.nn.Module):
    pass


class MLA(kvl.MLALayer, torch.nn.Module):
    pass


class World:
    """An fp32 layer, an fp8 layer and an MLA layer over random bytes, plus a valid step for them."""

    def __init__(self):
        g = torch.Generator().manual_seed(1234)
        self.specs = {"f32": kvl.AttentionSpec(H, D, torch.float32, BS),
                      "f32b": kvl.AttentionSpec(H, D, torch.float32, BS),
                      "fp8": kvl.AttentionSpec(H, D, torch.float8_e4m3fn, BS),
                      "mla": kvl.MLASpec(12, 4, torch.float32, BS)}
        layout = kvl.resolve_kv_cache_layout(self.specs, NB)
        self.caches = kvl.allocate_kv_cache(layout)
        for b in self.caches.buffers:
            b.copy_(torch.randint(-100, 100, b.shape, generator=g, dtype=torch.int8))
        self.attn = Attn(layer_name="f32", spec=self.specs["f32"], num_heads=HQ)
        self.mla = MLA(layer_name="mla", spec=self.specs["mla"], num_heads=HQ, scale=0.25)
        self.attn.bind_kv_cache(self.caches["f32"])
        self.mla.bind_kv_cache(self.caches["mla"])
        self.reqs = [kvl.ScheduledRequest(5, 1, [3, 0]), kvl.ScheduledRequest(0, 4, [5])]
        self.meta = kvl.build_attention_metadata(self.reqs, BS, num_blocks=NB)
        self.params = kvl.AttentionParams(HQ, H, D)
        self.t = self.meta.num_actual_tokens
        self.q = torch.randn(self.t, HQ, D, generator=g)
        self.k = torch.randn(self.t, H, D, generator=g)
        self.v = torch.randn(self.t, H, D, generator=g)
        self.slots = self.meta.slot_mapping
        self.out = torch.full_like(self.q, float("nan"))
        self.lse = torch.full((self.t, HQ), float("nan"))
        self.scale = torch.tensor([0.5])

    @property
    def kv(self):
        return self.caches["f32"]

    def fwd(self, q=None, kv=None, meta=None, params=None, **kw):
        kw.setdefault("out", self.out)
        return TORCH.forward(self.q if q is None else q, self.kv if kv is None else kv, meta or self.meta,
                             params or self.params, **kw)

    def snapshot(self):
        return [b.clone() for b in self.caches.buffers] + [self.out.clone(), self.lse.clone()]


CASES = {
    # ---- write_kv: shapes, dtypes, slot_mapping
    "k_wrong_heads": (lambda w: kvl.write_kv(w.kv, torch.randn(w.t, H + 1, D), w.v, w.slots), "k must be"),
    "k_wrong_head_size": (lambda w: kvl.write_kv(w.kv, torch.randn(w.t, H, D - 1), w.v, w.slots), "k must be"),
    "k_2d": (lambda w: kvl.write_kv(w.kv, w.k.reshape(w.t, -1), w.v, w.slots), "k must be"),
    "v_wrong_dtype": (lambda w: kvl.write_kv(w.kv, w.k, w.v.bfloat16(), w.slots), "v is bfloat16 but the cache"),
    "k_v_token_mismatch": (lambda w: kvl.write_kv(w.kv, w.k, w.v[:-1], w.slots), "tokens but v has"),
    "slot_past_end": (lambda w: kvl.write_kv(w.kv, w.k, w.v, torch.cat([w.slots[:-1], torch.tensor([NB * BS])])),
                      f"slot {NB * BS}.*0..{NB * BS - 1}"),
    "slot_below_minus_one": (lambda w: kvl.write_kv(w.kv, w.k, w.v, torch.cat([torch.tensor([-2]), w.slots[1:]])),
                             "slot -2"),
    "slot_float": (lambda w: kvl.write_kv(w.kv, w.k, w.v, w.slots.float()), "int32/int64"),
    "slot_2d": (lambda w: kvl.write_kv(w.kv, w.k, w.v, w.slots.view(1, -1)), "1-D"),
    "slot_too_short": (lambda w: kvl.write_kv(w.kv, w.k, w.v, w.slots[:-1]), "entries for"),
    "scale_on_plain_cache": (lambda w: kvl.write_kv(w.kv, w.k, w.v, w.slots, w.scale, w.scale), "only for fp8"),
    "fp8_scale_wrong_numel": (lambda w: kvl.write_kv(w.caches["fp8"], w.k, w.v, w.slots, torch.ones(H + 1)),
                              "k_scale must be"),
    "fp8_scale_float64": (lambda w: kvl.write_kv(w.caches["fp8"], w.k, w.v, w.slots, None, torch.ones(1).double()),
                          "v_scale must be"),
    "fp8_scale_2d": (lambda w: kvl.write_kv(w.caches["fp8"], w.k, w.v, w.slots, torch.ones(H, 1)), "k_scale must be"),
    "fp8_int_values": (lambda w: kvl.write_kv(w.caches["fp8"], w.k.int(), w.v, w.slots), "floating point"),
    "cache_3d": (lambda w: kvl.write_kv(w.kv[0], w.k, w.v, w.slots), "4-D packed cache"),
    "cache_odd_last_dim": (lambda w: kvl.write_kv(w.kv[..., 1:], w.k, w.v, w.slots), "not 2\\*head_size"),
    "cache_last_dim_strided": (lambda w: kvl.write_kv(w.kv[..., ::2], w.k[..., ::2], w.v[..., ::2], w.slots),
                               "contiguous"),
    # ---- forward: shapes, dtypes, metadata, optional buffers
    "q_wrong_heads": (lambda w: w.fwd(q=torch.randn(w.t, HQ + 1, D)), "q must be"),
    "q_wrong_head_size": (lambda w: w.fwd(q=torch.randn(w.t, HQ, D + 2)), "q must be"),
    "q_wrong_dtype": (lambda w: w.fwd(q=w.q.bfloat16(), out=None), "q is bfloat16 but the cache is float32"),
    "q_too_few_tokens": (lambda w: w.fwd(q=w.q[:-1], out=None), "metadata schedules"),
    "params_kv_heads": (lambda w: w.fwd(params=kvl.AttentionParams(HQ, 1, D)), "1 KV heads"),
    "params_head_size": (lambda w: w.fwd(q=torch.randn(w.t, HQ, 2 * D), params=kvl.AttentionParams(HQ, H, 2 * D)),
                         "size 16"),
    "meta_block_size": (lambda w: w.fwd(meta=kvl.build_attention_metadata(w.reqs, BS * 2, num_blocks=NB)),
                        "blocks of 8 tokens"),
    "meta_more_blocks_than_cache": (
        lambda w: w.fwd(meta=kvl.build_attention_metadata(w.reqs, BS, num_blocks=NB + 5)), "cache has 6 blocks"),
    "meta_not_metadata": (lambda w: w.fwd(meta={"seq_lens": 1}), "AttentionMetadata"),
    "params_not_params": (lambda w: w.fwd(params=(HQ, H, D)), "AttentionParams"),
    "sinks_wrong_shape": (lambda w: w.fwd(sinks=torch.zeros(H)), "sinks must be"),
    "sinks_float64": (lambda w: w.fwd(sinks=torch.zeros(HQ, dtype=torch.float64)), "sinks must be"),
    "out_wrong_shape": (lambda w: w.fwd(out=torch.zeros(w.t, HQ, D + 1)), "out must be a float32 tensor of shape"),
    "out_wrong_dtype": (lambda w: w.fwd(out=torch.zeros(w.t, HQ, D, dtype=torch.float16)), "out must be a float32 tensor of shape"),
    "lse_wrong_shape": (lambda w: w.fwd(lse=torch.zeros(w.t, H)), "lse must be"),
    "lse_float64": (lambda w: w.fwd(lse=torch.zeros(w.t, HQ, dtype=torch.float64)), "lse must be"),
    "scale_on_plain_forward": (lambda w: w.fwd(k_scale=w.scale), "only for fp8"),
    "fp8_forward_scale_numel": (
        lambda w: w.fwd(kv=w.caches["fp8"], k_scale=torch.ones(H + 1)), "k_scale must be"),
    # ---- params and specs
    "negative_soft_cap_params": (lambda w: kvl.AttentionParams(HQ, H, D, logits_soft_cap=-5.0), "logits_soft_cap"),
    "negative_soft_cap_spec": (lambda w: kvl.AttentionSpec(H, D, logits_soft_cap=-1), "logits_soft_cap"),
    "heads_do_not_divide": (lambda w: kvl.AttentionParams(6, 4, D), "not a multiple of num_kv_heads 4"),
    "params_zero_window": (lambda w: kvl.AttentionParams(HQ, H, D, sliding_window=0), "sliding_window"),
    "params_zero_heads": (lambda w: kvl.AttentionParams(0, H, D), "num_heads"),
    # ---- planner
    "budget_too_small": (lambda w: kvl.plan_kv_cache(w.specs, 100), "too small for one block"),
    # ---- block ids
    "zero_blocks_out_of_range": (lambda w: kvl.zero_blocks(w.caches, [0, NB]), f"block id {NB} is out of range"),
    "zero_blocks_negative": (lambda w: kvl.zero_blocks(w.caches, [-1, 2]), "block id -1 is out of range"),
    "zero_blocks_float_ids": (lambda w: kvl.zero_blocks(w.caches, [1.0]), "integer"),
    "zero_blocks_2d_ids": (lambda w: kvl.zero_blocks(w.caches, [[1, 2]]), "1-D"),
    "zero_blocks_bad_group": (lambda w: kvl.zero_blocks(w.caches, [0], group=7), "group 7 does not exist"),
    "zero_blocks_not_a_cache": (lambda w: kvl.zero_blocks(dict(w.caches), [0]), "KVCache"),
    "copy_src_out_of_range": (lambda w: kvl.copy_blocks(w.caches, [0, NB], [1, 2]), "src: block id 6"),
    "copy_dst_out_of_range": (lambda w: kvl.copy_blocks(w.kv, [0], [NB + 3]), "dst: block id 9"),
    "copy_duplicate_dst": (lambda w: kvl.copy_blocks(w.caches, [0, 1], [2, 2]), "destination block appears twice"),
    "copy_length_mismatch": (lambda w: kvl.copy_blocks(w.caches, [0, 1], [2]), "2 source blocks but 1"),
    "copy_bad_group": (lambda w: kvl.copy_blocks(w.caches, [0], [1], group=9), "group 9"),
    "copy_not_a_cache": (lambda w: kvl.copy_blocks([1, 2], [0], [1]), "KVCache or a layer"),
    "gather_out_of_range": (lambda w: kvl.gather_kv(w.kv, [NB], 1), "out of range"),
    "gather_too_many_tokens": (lambda w: kvl.gather_kv(w.kv, [0], BS + 1), "do not fit"),
    # ---- metadata: ids out of range, a block table longer than the cache
    "meta_block_id_out_of_range": (
        lambda w: kvl.build_attention_metadata([kvl.ScheduledRequest(0, 2, [NB])], BS, num_blocks=NB), "out of range"),
    "meta_table_longer_than_cache": (
        lambda w: kvl.build_attention_metadata(w.reqs, BS, num_blocks=NB, max_blocks_per_request=NB + 1),
        "longer than the cache"),
    "meta_request_longer_than_cache": (
        lambda w: kvl.build_attention_metadata([kvl.ScheduledRequest(0, BS * NB + 1, list(range(NB)) + [0])],
                                               BS, num_blocks=NB), "longer than the cache"),
    # ---- layers
    "attend_bad_q": (lambda w: w.attn.attend(torch.randn(w.t, HQ + 2, D), w.k, w.v, w.meta, TORCH, out=w.out),
                     "q must be"),
    "attend_out_wrong_dtype": (lambda w: w.attn.attend(w.q, w.k, w.v, w.meta, TORCH,
                                                       out=torch.zeros(w.t, HQ, D, dtype=torch.float16)),
                               "out must be a float32 tensor of shape"),
    "attend_meta_block_size": (
        lambda w: w.attn.attend(w.q, w.k, w.v, kvl.build_attention_metadata(w.reqs, BS * 2, num_blocks=NB), TORCH),
        "blocks of 8 tokens"),
    "attend_k_without_v": (lambda w: w.attn.attend(w.q, w.k, None, w.meta, TORCH), "both k and v"),
    "attend_unbound": (lambda w: Attn(layer_name="x", spec=w.specs["f32"], num_heads=HQ)
                       .attend(w.q, w.k, w.v, w.meta, TORCH), "no cache bound"),
    "bind_wrong_shape": (lambda w: w.attn.bind_kv_cache(w.caches["mla"]), "expects a cache of shape"),
    "bind_wrong_dtype": (lambda w: w.attn.bind_kv_cache(w.caches["fp8"]), "expects a torch.float32 cache"),
    "mla_latent_wrong_width": (lambda w: w.mla.write_latent(torch.randn(w.t, 15), w.slots), "latent must be"),
    "mla_latent_wrong_dtype": (lambda w: w.mla.write_latent(torch.randn(w.t, 16).half(), w.slots), "latent must be"),
    "mla_slot_past_end": (lambda w: w.mla.write_latent(torch.randn(2, 16), torch.tensor([0, NB * BS])),
                          "slot_mapping has slot 24"),
    "mla_slot_float": (lambda w: w.mla.write_latent(torch.randn(2, 16), torch.tensor([0.0, 1.0])), "slot_mapping"),
    "mla_slot_too_short": (lambda w: w.mla.write_latent(torch.randn(3, 16), torch.tensor([0, 1])), "slot_mapping"),
    "mla_forward_q_width": (lambda w: w.mla.attend(torch.randn(w.t, HQ, 15), None, w.meta, TORCH), "MLA needs"),
    "mla_forward_meta_block_size": (
        lambda w: w.mla.attend(torch.randn(w.t, HQ, 16), None,
                               kvl.build_attention_metadata(w.reqs, BS * 2, num_blocks=NB), TORCH), "blocks of"),
    "mla_forward_q_too_few_tokens": (lambda w: w.mla.attend(torch.randn(w.t - 1, HQ, 16), None, w.meta, TORCH),
                                     "schedules"),
    "mla_attend_bad_q_with_latent": (
        lambda w: w.mla.attend(torch.randn(w.t, HQ + 1, 15), torch.randn(w.t, 16), w.meta, TORCH), "MLA needs"),
    "mla_attend_q_dtype_with_latent": (
        lambda w: w.mla.attend(torch.randn(w.t, HQ, 16).half(), torch.randn(w.t, 16), w.meta, TORCH), "q is float16"),
    "mla_attend_meta_block_size_with_latent": (
        lambda w: w.mla.attend(torch.randn(w.t, HQ, 16), torch.randn(w.t, 16), kvl.build_attention_metadata(
            w.reqs, BS * 2, num_blocks=NB), TORCH), "blocks of"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_before_touching_memory(case):
    fn, match = CASES[case]
    w = World()
    before = w.snapshot()
    with pytest.raises(KVLayoutError, match=match):
        fn(w)
    after = w.snapshot()
    for a, b in zip(before, after):
        assert torch.equal(a.view(torch.int8) if a.dtype == torch.int8 else a.nan_to_num(7.0),
                           b.view(torch.int8) if b.dtype == torch.int8 else b.nan_to_num(7.0)), case
    assert w.out.isnan().all() and w.lse.isnan().all()


def test_the_world_is_valid():
    """The same calls with good inputs work, so each bad case fails for the one thing it changes."""
    w = World()
    kvl.write_kv(w.kv, w.k, w.v, w.slots)
    kvl.write_kv(w.caches["fp8"], w.k, w.v, w.slots, w.scale, w.scale)
    out, lse = w.fwd(lse=w.lse)
    assert not out.isnan().any() and not lse.isnan().any()
    w.attn.attend(w.q, w.k, w.v, w.meta, TORCH)
    w.mla.attend(torch.randn(w.t, HQ, 16), torch.randn(w.t, 16), w.meta, TORCH)
    kvl.zero_blocks(w.caches, [0, NB - 1])
    kvl.copy_blocks(w.caches, [0, 1], [2, 3])
    kvl.plan_kv_cache(w.specs, 1 << 20)
