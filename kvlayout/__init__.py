"""kvlayout: one packed, blocks-first KV-cache layout for every layer of a model, resolved once."""

from .allocation import KVCache, allocate_kv_cache
from .block_table import BlockTable
from .capacity import Capacity, plan_capacity
from .cache_ops import gather_kv, write_kv
from .capabilities import BackendCapabilities, ConnectorWishes
from .custom_ops import StepContext, step_context
from .errors import (BackendUnavailableError, KVLayoutError, LayoutConflictError, UnsupportedFeatureError)
from .layers import AttentionLayer, MambaLayer, MLALayer, bind_kv_cache, mamba_state_views
from .layout import GroupLayout, KVCacheLayout, LayerLayout, resolve_kv_cache_layout
from .ops import copy_blocks, zero_blocks
from .metadata import (AttentionMetadata, ScheduledRequest, build_attention_metadata, order_decodes_first,
                       validate_attention_metadata)
from .page_pool import PagePool, PoolExhaustedError
from .params import AttentionParams
from .planner import GroupPlan, KVCachePlan, plan_kv_cache
from .registry import get_attention_backend
from .specs import AttentionKind, AttentionSpec, MambaSpec, MLASpec, parse_dtype
from .step_buffers import StepBuffers

__version__ = "0.1.0"


__all__ = [
    "AttentionKind", "AttentionLayer", "AttentionMetadata", "AttentionParams", "AttentionSpec",
    "BackendCapabilities", "BackendUnavailableError", "BlockTable", "Capacity", "ConnectorWishes", "GroupLayout",
    "GroupPlan", "KVCache", "KVCacheLayout", "KVCachePlan", "KVLayoutError", "LayerLayout", "LayoutConflictError",
    "MLALayer", "MLASpec", "MambaLayer", "MambaSpec", "PagePool", "PoolExhaustedError", "ScheduledRequest",
    "StepBuffers", "StepContext", "UnsupportedFeatureError", "allocate_kv_cache", "bind_kv_cache",
    "build_attention_metadata", "copy_blocks", "gather_kv", "get_attention_backend", "mamba_state_views",
    "order_decodes_first", "parse_dtype", "plan_capacity", "plan_kv_cache", "resolve_kv_cache_layout",
    "step_context", "validate_attention_metadata", "write_kv", "zero_blocks",
]
