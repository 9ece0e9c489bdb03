"""A transformers causal LM whose attention runs on kvlayout caches.

The model is transformers' own modeling code (``AutoModelForCausalLM.from_config``, or ``from_pretrained``
on a local checkpoint); kvlayout registers one attention implementation, ``"kvlayout"``, through
transformers' attention interface. Each engine step runs the model once over the step's tokens packed as
one sequence (``input_ids [1, T]``, ``position_ids [1, T]``: RoPE sees every token's own position) with
``use_cache=False``; transformers builds no mask (the ``"kvlayout"`` mask function returns None) and
calls ``kvlayout_attention`` per layer with q/k/v after RoPE. That function appends the layer's new K/V
through the step's ``slot_mapping`` into the layer's packed pages and attends over them with the selected
backend (``AttentionLayer.attend``), so requests never see each other.

Served: decoders whose attention takes q/k/v (Llama, Mistral, Qwen2/3, Qwen3-MoE, Gemma 2/3 with soft caps
and sliding windows, Phi-3, Mixtral, GPT-OSS with learned sinks, Olmo2, Granite, Falcon multi-query, GPT-2,
...). Refused in one line: layers with recurrent state (Mamba, linear attention), layers that read another
layer's KV (Gemma-3n), and MLA (DeepSeek): transformers' MLA expands the latent into per-head K and V
before attention, while kvlayout caches the latent itself (``MLASpec``), which needs the absorbed form
``MLALayer`` serves.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..custom_ops import current_step, step_context
from ..errors import KVLayoutError
from ..hf_config import load_hf_config, specs_from_hf_config
from ..layers import AttentionLayer
from ..metadata import AttentionMetadata
from ..specs import AttentionSpec
from ..tp import query_head_range
from .tensor_parallel import TensorParallel, shard_model

IMPLEMENTATION = "kvlayout"


class KVLayoutAttention(AttentionLayer, nn.Module):
    """The kvlayout side of one transformers attention module: its cache views, scale, window, sinks."""


def kvlayout_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [1, H, T, D]``, ``key``/``value [1, H_kv, T, D]`` of the
    step's packed tokens -> ``[1, T, H, D]``. Masks and the other keyword arguments are ignored: the step's
    metadata says which keys each token sees, the layer's spec holds the window, soft cap and sinks.
    The step comes from the ``kvlayout.step_context`` that ``HFCausalLM.forward`` opens (not every family
    forwards extra keyword arguments down to its attention function); under ``torch.compile`` each layer
    is one ``torch.ops.kvlayout.attend`` call."""
    layer = getattr(module, "_kvlayout_layer", None)
    if layer is None:
        raise KVLayoutError("the 'kvlayout' attention implementation runs only inside HFCausalLM.forward")
    if query.shape[0] != 1:
        raise KVLayoutError(f"kvlayout attention takes the step's tokens packed as one sequence, got batch "
                            f"{query.shape[0]}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))          # [T, heads, D] views
    if torch.compiler.is_compiling():
        out = layer.attend_op(q, k, v)
    else:
        step = current_step("the 'kvlayout' attention implementation")
        out = layer.attend(q, k, v, step.meta, step.backend, validate=step.validate)
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs):
    return None


def register_attention() -> None:
    """Register ``"kvlayout"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    AttentionInterface.register(IMPLEMENTATION, kvlayout_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)


def _attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """The decoder's attention modules by ``layer_idx``."""
    found = {}
    for m in model.modules():
        if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int):
            found[m.layer_idx] = m
    return found


def served_specs(cfg, kv_dtype: torch.dtype, block_size: int, tp_size: int = 1) -> dict[str, AttentionSpec]:
    """The layer specs (of one tensor-parallel rank) of a transformers config the runner can serve
    (attention-only), or a one-line refusal; cheap, so it runs before any weight is made."""
    specs = specs_from_hf_config(cfg.to_dict(), kv_dtype=kv_dtype, block_size=block_size, tp_size=tp_size)
    if not all(isinstance(s, AttentionSpec) for s in specs.values()):
        kinds = sorted({type(s).__name__ for s in specs.values()} - {"AttentionSpec"})
        raise KVLayoutError(f"{cfg.model_type}: the runner serves attention-only decoders; this model has {kinds} "
                            f"layers (state pages or MLA latents: plan them, run them with MLALayer or your own "
                            f"mixers)")
    return specs


class HFCausalLM(nn.Module):
    """A transformers causal LM (``self.hf``) plus one ``KVLayoutAttention`` per attention layer.
    ``tp``: this rank's place in a tensor-parallel group; the model is then sharded (``shard_model``) and
    the layers and specs hold this rank's heads."""

    def __init__(self, hf_model: nn.Module, kv_dtype: torch.dtype, block_size: int,
                 tp: Optional[TensorParallel] = None):
        super().__init__()
        self.hf = hf_model.requires_grad_(False)    # inference only: the attention ops have no backward
        self.config = hf_model.config
        self.tp = tp or TensorParallel()
        mt = self.config.model_type
        specs = served_specs(self.config, kv_dtype, block_size, self.tp.size)
        modules = _attention_modules(hf_model)
        want = {int(name.split(".")[2]): name for name in specs}
        if sorted(want) != sorted(modules):
            raise KVLayoutError(f"{mt}: the runner needs one cache per attention layer; layers "
                                f"{sorted(set(modules) - set(want))} own no cache (they read another layer's KV)")
        if getattr(hf_model, "_kvlayout_tp", (0, 1)) != (self.tp.rank, self.tp.size):
            raise KVLayoutError(f"{mt}: the model is not sharded for tensor-parallel rank {self.tp.rank} of "
                                f"{self.tp.size}; build it with build_model(..., tp=)")
        num_heads = query_head_range(self.tp.rank, self.tp.size, int(self.config.num_attention_heads))[1]
        layers = {}
        for idx, module in sorted(modules.items()):
            spec = specs[want[idx]]
            head_dim = getattr(module, "head_dim", spec.head_size)
            groups = getattr(module, "num_key_value_groups", None)
            kv_heads = num_heads // groups if groups else spec.num_kv_heads
            if head_dim != spec.head_size or kv_heads != spec.num_kv_heads:
                raise KVLayoutError(f"{mt}: layer {idx} attends with {kv_heads} KV heads of size {head_dim}, but its "
                                    f"config says {spec.num_kv_heads} of {spec.head_size}; fix the config")
            if getattr(module, "is_causal", True) is False:
                raise KVLayoutError(f"{mt}: layer {idx} attends non-causally; the runner serves causal decoders")
            sinks = getattr(module, "sinks", None)
            if sinks is not None:
                spec = dataclasses.replace(spec, has_sinks=True)
                specs[want[idx]] = spec
            layer = KVLayoutAttention(layer_name=want[idx], spec=spec, num_heads=num_heads,
                                      scale=float(module.scaling),
                                      sinks=None if sinks is None else sinks.detach().float())
            object.__setattr__(module, "_kvlayout_layer", layer)       # not a submodule of transformers' module
            layers[want[idx]] = layer
        self.kv_specs = specs
        self._layers = layers
        self._run = self._run_eager

    def check_backend(self, attention_backend) -> None:
        """Refuse ``attention_backend`` now if it cannot serve every layer."""
        for layer in self._layers.values():
            layer.check_backend(attention_backend)

    def run_step(self, input_ids: torch.Tensor, positions: torch.Tensor, keep) -> torch.Tensor:
        """The transformers model over the step's tokens (eager or compiled), inside a ``step_context``
        the caller opened: logits ``[R, V]`` of the token rows ``keep`` (0: every token)."""
        return self._run(input_ids, positions, keep)

    def compile_model(self, attention_backend, **compile_kwargs) -> None:
        """Run the transformers model under ``torch.compile(fullgraph=True)`` from now on (extra keyword
        arguments go to ``torch.compile``; ``dynamic=True`` by default, so one graph serves every step
        length). ``attention_backend`` (the one the engine uses) is checked against every layer now,
        since the compiled attention ops run without the layers' first-call checks."""
        self.check_backend(attention_backend)
        compile_kwargs.setdefault("dynamic", True)
        self._run = torch.compile(self._run_eager, fullgraph=True, **compile_kwargs)

    def _run_eager(self, input_ids: torch.Tensor, positions: torch.Tensor, keep) -> torch.Tensor:
        return self.hf(input_ids=input_ids[None], position_ids=positions[None], use_cache=False,
                       logits_to_keep=keep).logits[0]

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def attention_layers(self) -> dict[str, KVLayoutAttention]:
        """``{layer name: layer}``, what ``bind_kv_cache`` takes."""
        return dict(self._layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, backend,
                all_logits: bool = False, validate: bool = True) -> torch.Tensor:
        """Run the step's tokens (``input_ids``, ``positions`` ``[T]``). Returns logits ``[num_reqs, V]``
        of each request's last scheduled token, or ``[T, V]`` for every token with ``all_logits``."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise KVLayoutError(f"input_ids and positions must be 1-D of one length, got "
                                f"{tuple(input_ids.shape)} and {tuple(positions.shape)}")
        if input_ids.shape[0] != meta.num_actual_tokens:
            raise KVLayoutError(f"{input_ids.shape[0]} tokens given, the metadata schedules {meta.num_actual_tokens}")
        keep = 0 if all_logits else meta.query_start_loc[1:].long() - 1
        with step_context(meta, backend, validate=validate):
            return self._run(input_ids, positions, keep)


def hf_model_config(config: Union[dict, str, Path]):
    """The transformers config of a ``config.json`` dict, path, folder or shipped name (its text decoder
    for multimodal models)."""
    from ..hf_config import text_config
    cfg = dict(config) if isinstance(config, dict) else load_hf_config(config)
    return text_config(cfg)


def build_model(config, *, weights: Union[str, Path, None] = None, seed: int = 0,
                dtype: torch.dtype = torch.float32, block_size: int = 16,
                device: Union[str, torch.device] = "cpu", tp: Optional[TensorParallel] = None) -> HFCausalLM:
    """transformers' model for ``config`` (a ``config.json`` dict, path, folder or shipped name, or a
    transformers config) with weights from a local ``weights`` checkpoint (safetensors, never fetched) or
    seeded random ones, in ``dtype`` on ``device``, its attention on kvlayout caches; with ``tp``, this
    rank's shard of it (every rank builds the same whole model first, then keeps its part)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise KVLayoutError(f'the model runner runs transformers\' modeling code: pip install "kvlayout[hf]" ({e})') \
            from None
    register_attention()
    cfg = config if hasattr(config, "to_dict") else hf_model_config(config)
    cfg._attn_implementation = IMPLEMENTATION
    served_specs(cfg, dtype, block_size, tp.size if tp else 1)     # refuse before any weight is made
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise KVLayoutError(f"no weights at {path}")
        try:
            hf = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=torch.float32, local_files_only=True,
                                                      attn_implementation=IMPLEMENTATION)
        except (OSError, ValueError, RuntimeError) as e:
            raise KVLayoutError(f"weights in {path} do not fit the config: {' '.join(str(e).split())[:300]}") \
                from None
    else:
        devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            try:
                hf = AutoModelForCausalLM.from_config(cfg, attn_implementation=IMPLEMENTATION)
            except ValueError as e:
                raise KVLayoutError(f"{cfg.model_type}: transformers has no causal LM for this config "
                                    f"({' '.join(str(e).split())[:200]})") from None
    if tp is not None and tp.enabled:
        shard_model(hf, _attention_modules(hf), tp)
    hf = hf.to(device=device, dtype=dtype).eval()
    return HFCausalLM(hf, kv_dtype=dtype, block_size=block_size, tp=tp).to(device)
