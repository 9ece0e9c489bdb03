"""Specs: bytes per block, block shapes, Mamba state slicing, and refusal of bad values."""

import math

import pytest
import torch

import kvlayout as kvl
from kvlayout.errors import KVLayoutError
from kvlayout.specs import STATE_ALIGN_BYTES

ALL_KV_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float8_e4m3fn: 1, torch.float8_e5m2: 1}


@pytest.mark.parametrize("dtype", ALL_KV_DTYPES)
@pytest.mark.parametrize("heads,head_size,block", [(8, 128, 16), (1, 64, 1), (3, 80, 7)])
def test_attention_page_bytes_and_block_shape(dtype, heads, head_size, block):
    spec = kvl.AttentionSpec(num_kv_heads=heads, head_size=head_size, dtype=dtype, block_size=block)
    assert spec.block_shape() == (heads, block, 2 * head_size)
    assert spec.page_size_bytes == block * heads * 2 * head_size * ITEMSIZE[dtype]
    assert spec.token_bytes * block == spec.page_size_bytes
    raised = spec.with_block_size(4 * block)
    assert raised.block_size == 4 * block and raised.page_size_bytes == 4 * spec.page_size_bytes
    assert spec.block_size == block                      # frozen: with_block_size returns a new spec


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("float32", torch.float32),
                                        ("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2),
                                        ("torch.bfloat16", torch.bfloat16), ("FP8_E4M3", torch.float8_e4m3fn)])
def test_parse_dtype_names(name, dtype):
    assert kvl.parse_dtype(name) is dtype
    assert kvl.AttentionSpec(1, 8, dtype=name).dtype is dtype


def test_parse_dtype_unknown_lists_known_names():
    with pytest.raises(KVLayoutError, match="unknown dtype 'fp4'.*bf16.*fp8_e5m2"):
        kvl.parse_dtype("fp4")
    with pytest.raises(KVLayoutError, match="auto"):      # 'auto' is not a concrete dtype
        kvl.parse_dtype("auto")


def test_attention_kinds_and_causality():
    assert kvl.AttentionSpec(1, 8).causal
    assert not kvl.AttentionSpec(1, 8, kind="encoder").causal
    cross = kvl.AttentionSpec(1, 8, kind=kvl.AttentionKind.CROSS)
    assert not cross.causal and cross.kind is kvl.AttentionKind.CROSS
    with pytest.raises(ValueError):
        kvl.AttentionSpec(1, 8, kind="sideways")


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_kv_heads=0, head_size=8), "num_kv_heads"),
    (dict(num_kv_heads=-2, head_size=8), "num_kv_heads"),
    (dict(num_kv_heads=2.0, head_size=8), "num_kv_heads"),
    (dict(num_kv_heads=True, head_size=8), "num_kv_heads"),
    (dict(num_kv_heads=2, head_size=0), "head_size"),
    (dict(num_kv_heads=2, head_size=8, block_size=0), "block_size"),
    (dict(num_kv_heads=2, head_size=8, sliding_window=0), "sliding_window"),
    (dict(num_kv_heads=2, head_size=8, dtype=torch.int8), "not a KV-cache dtype"),
    (dict(num_kv_heads=2, head_size=8, dtype=torch.float64), "not a KV-cache dtype"),
    (dict(num_kv_heads=2, head_size=8, logits_soft_cap=-30.0), "logits_soft_cap"),
])
def test_attention_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(KVLayoutError, match=match):
        kvl.AttentionSpec(**kwargs)


def test_soft_cap_zero_means_off():
    assert kvl.AttentionSpec(2, 8, logits_soft_cap=0).logits_soft_cap is None
    assert kvl.AttentionSpec(2, 8, logits_soft_cap=50.0).logits_soft_cap == 50.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32])
def test_mla_spec(dtype):
    spec = kvl.MLASpec(kv_lora_rank=512, rope_dim=64, dtype=dtype, block_size=32)
    assert spec.latent_size == 576
    assert spec.block_shape() == (1, 32, 576)
    assert spec.page_size_bytes == 32 * 576 * ITEMSIZE[dtype]
    with pytest.raises(KVLayoutError, match="rope_dim"):
        kvl.MLASpec(kv_lora_rank=512, rope_dim=0)
    with pytest.raises(KVLayoutError, match="KV-cache dtype"):
        kvl.MLASpec(kv_lora_rank=512, rope_dim=64, dtype=torch.int8)


def _mamba(conv_dim=100, conv_k=3, heads=3, head_dim=5, d_state=7, conv_dtype=torch.bfloat16,
           ssm_dtype=torch.float32, **kw):
    return kvl.MambaSpec(states={"conv": ((conv_dim, conv_k), conv_dtype),
                                 "ssm": ((heads, head_dim, d_state), ssm_dtype)}, **kw)


@pytest.mark.parametrize("conv_dim,conv_dtype,ssm_dtype", [
    (100, torch.bfloat16, torch.float32),     # 600 B conv: ssm must move up to the next 16-B boundary
    (7, torch.float16, torch.float16),        # 42 B conv
    (8, torch.float32, torch.bfloat16),       # 96 B conv: already aligned
])
def test_mamba_slices_aligned_disjoint_inside_page(conv_dim, conv_dtype, ssm_dtype):
    spec = _mamba(conv_dim=conv_dim, conv_dtype=conv_dtype, ssm_dtype=ssm_dtype)
    slices = spec.slices()
    assert [s.name for s in slices] == ["conv", "ssm"]
    conv, ssm = slices
    assert conv.byte_offset == 0
    assert conv.nbytes == conv_dim * 3 * conv_dtype.itemsize
    assert ssm.nbytes == 3 * 5 * 7 * ssm_dtype.itemsize
    # aligned: next 16-byte boundary after the conv state, not later
    assert ssm.byte_offset % STATE_ALIGN_BYTES == 0
    assert conv.nbytes <= ssm.byte_offset < conv.nbytes + STATE_ALIGN_BYTES
    # inside the page, page rounded up to 16 B
    assert ssm.byte_offset + ssm.nbytes <= spec.state_bytes == spec.page_size_bytes
    assert spec.state_bytes % STATE_ALIGN_BYTES == 0 and spec.state_bytes - (ssm.byte_offset + ssm.nbytes) < 16
    assert spec.padding_bytes == 0
    assert spec.block_shape() == (1, 1, spec.page_size_bytes) and spec.dtype is torch.int8


def test_mamba_padding():
    spec = _mamba()
    padded = spec.padded_to(spec.state_bytes + 1000)
    assert padded.page_size_bytes == spec.state_bytes + 1000
    assert padded.padding_bytes == 1000
    assert padded.slices() == spec.slices()             # padding goes at the end; states do not move
    assert padded.block_shape() == (1, 1, spec.state_bytes + 1000)
    with pytest.raises(KVLayoutError, match="smaller than its states"):
        spec.padded_to(spec.state_bytes - 16)


def test_mamba_spec_hash_and_equality():
    a, b = _mamba(), _mamba()
    assert a == b and hash(a) == hash(b)
    assert a != _mamba(d_state=8)
    assert len({a, b, a.padded_to(a.state_bytes + 16)}) == 2


@pytest.mark.parametrize("states,match", [
    ({}, "empty"),
    ({"conv": ((0, 3), torch.bfloat16)}, "bad shape"),
    ({"conv": ((4, -1), torch.bfloat16)}, "bad shape"),
    ({"conv": ((), torch.bfloat16)}, "bad shape"),
    ({"conv": (4, 3)}, "must be \\(shape, dtype\\)"),
    ({"conv": ((4, 3), torch.bfloat16, 1)}, "must be \\(shape, dtype\\)"),
    ({"conv": ((4, 3), "fp4")}, "unknown dtype"),
])
def test_mamba_spec_rejects_bad_states(states, match):
    with pytest.raises(KVLayoutError, match=match):
        kvl.MambaSpec(states=states)


def test_mamba_state_bytes_match_shapes():
    spec = kvl.MambaSpec(states={"a": ((3,), torch.float32), "b": ((5, 2), torch.float16), "c": ((1,), torch.int8)})
    offsets = [s.byte_offset for s in spec.slices()]
    assert offsets == [0, 16, 48]
    assert spec.state_bytes == 64
    assert sum(math.prod(s.shape) * s.dtype.itemsize for s in spec.slices()) == 12 + 20 + 1
