"""Tensor parallelism for the runner's transformers models, over ``torch.distributed`` (gloo on CPU, NCCL on
GPUs).

Each rank builds the whole model (the same seeded or loaded weights), then ``shard_model`` keeps its part
of every decoder layer, as Megatron-style serving engines do:

- attention: ``q_proj`` keeps the rows of this rank's query heads, ``k_proj``/``v_proj`` the rows of its KV
  heads (``kvlayout.tp``: a replica of one KV head when there are fewer KV heads than ranks), ``o_proj``
  the matching input columns; learned ``sinks`` keep this rank's heads; per-head norms (``q_norm`` /
  ``k_norm`` of ``head_dim``) stay whole;
- MLP: ``gate_proj``/``up_proj`` keep rows ``[r*I/T, (r+1)*I/T)`` of the intermediate size, ``down_proj``
  the matching columns;
- ``o_proj`` and ``down_proj`` (row-parallel) all-reduce their outputs: one all-reduce per attention block
  and one per MLP; their biases stay on rank 0 only, so the sum adds them once. Embeddings, norms and the
  LM head stay whole (replicated), so every rank computes the same logits.

Families whose projections are fused (``qkv_proj``, ``gate_up_proj``: Phi-3, Falcon, GPT-2), whose
experts are fused tensors (Mixtral, Qwen3-MoE, GPT-OSS), or whose norms span all heads (OLMo-2's
``q_norm`` over ``H * head_dim``) are refused in one line: sharding them needs per-family code.

Launch one process per rank with the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``; ``LOCAL_RANK`` picks the GPU) and build each rank's engine with
``Engine(..., tp=TensorParallel.from_env())``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import msgpack
import torch
from torch import nn

from ..errors import KVLayoutError
from ..tp import kv_head_range, query_head_range


@dataclass(frozen=True)
class TensorParallel:
    """One rank's place in a tensor-parallel group: ``rank`` of ``size``, and the ``torch.distributed``
    process group that connects them (None: the default group)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def __post_init__(self):
        query_head_range(self.rank, self.size, self.size)            # checks rank and size
        if self.size > 1 and not torch.distributed.is_initialized():
            raise KVLayoutError("tensor parallelism needs torch.distributed.init_process_group first "
                                "(or TensorParallel.from_env())")

    @classmethod
    def from_env(cls, backend: Optional[str] = None, group: Any = None) -> "TensorParallel":
        """This process's rank from the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
        ``MASTER_PORT``), initializing the default process group if needed (``backend``: NCCL when CUDA is
        available, else gloo). Without ``WORLD_SIZE`` in the environment: a single rank."""
        dist = torch.distributed
        if group is None and not dist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) == 1:
                return cls()
            missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise KVLayoutError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun, "
                                    f"or set the torchrun environment for every rank")
            dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def _src(self) -> int:
        """The global rank of this group's rank 0 (what ``broadcast`` calls want)."""
        return torch.distributed.get_global_rank(self.group, 0) if self.group is not None else 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place."""
        if self.enabled:
            torch.distributed.all_reduce(t, group=self.group)
        return t

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank, in place."""
        if self.enabled:
            torch.distributed.broadcast(t, self._src(), group=self.group)
        return t

    def close(self, wait: bool = True) -> None:
        """Leave the group at the end of a rank's work: with ``wait``, a barrier first, so no rank tears its
        process group down while a peer is still inside a collective (gloo then aborts the peer's process
        at exit with "terminate called without an active exception"); then ``destroy_process_group``.
        Pass ``wait=False`` on an error path, where a peer may never reach the barrier. No-op for one rank."""
        if not self.enabled or not torch.distributed.is_initialized():
            return
        if wait:
            torch.distributed.barrier(group=self.group)
        torch.distributed.destroy_process_group(self.group)

    def _device(self) -> torch.device:
        backend = torch.distributed.get_backend(self.group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (msgpack data: dicts, lists, strings, numbers) on every rank. msgpack, not
        pickle: nothing a rank receives is evaluated."""
        if not self.enabled:
            return obj
        data = msgpack.packb(obj) if self.rank == 0 else b""
        n = self.broadcast_(torch.tensor([len(data)], dtype=torch.long, device=self._device()))
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self._device()) if self.rank == 0 else \
            torch.empty(int(n), dtype=torch.uint8, device=self._device())
        self.broadcast_(buf)
        return msgpack.unpackb(buf.cpu().numpy().tobytes(), strict_map_key=False)

    def all_gather_object(self, obj: Any) -> list:
        """Every rank's ``obj`` (msgpack data), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        dev = self._device()
        data = msgpack.packb(obj)
        sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(self.size)]
        torch.distributed.all_gather(sizes, torch.tensor([len(data)], dtype=torch.long, device=dev), group=self.group)
        width = max(int(s) for s in sizes)
        buf = torch.zeros(width, dtype=torch.uint8, device=dev)
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)    # msgpack data is never empty
        out = [torch.empty(width, dtype=torch.uint8, device=dev) for _ in range(self.size)]
        torch.distributed.all_gather(out, buf, group=self.group)
        return [msgpack.unpackb(o[:int(s)].cpu().numpy().tobytes(), strict_map_key=False) for o, s in zip(out, sizes)]


def _rows(linear: nn.Linear, start: int, stop: int) -> None:
    """Keep output features ``[start, stop)`` of ``linear`` (a column-parallel shard)."""
    linear.weight = nn.Parameter(linear.weight.data[start:stop].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[start:stop].clone(), requires_grad=False)
    linear.out_features = stop - start


def _columns(linear: nn.Linear, start: int, stop: int, tp: TensorParallel) -> None:
    """Keep input features ``[start, stop)`` of ``linear`` and all-reduce its output (a row-parallel
    shard); its bias stays on rank 0 only, so the sum adds it once."""
    linear.weight = nn.Parameter(linear.weight.data[:, start:stop].clone(), requires_grad=False)
    if linear.bias is not None and tp.rank != 0:
        linear.bias = nn.Parameter(torch.zeros_like(linear.bias.data), requires_grad=False)
    linear.in_features = stop - start
    linear.register_forward_hook(lambda mod, args, out: tp.all_reduce_(out))


def _linear(module: nn.Module, name: str, what: str) -> nn.Linear:
    lin = getattr(module, name, None)
    if not isinstance(lin, nn.Linear):
        raise KVLayoutError(f"{what}: tensor parallelism shards q/k/v/o_proj and gate/up/down_proj linear layers; "
                            f"this model has no {name} linear layer there (fused projections or experts need "
                            f"per-family sharding, which kvlayout does not have)")
    return lin


def _check_attention(attn: nn.Module, heads: int, kv_heads: int, what: str) -> int:
    """The head size of ``attn``, or why tensor parallelism cannot shard it."""
    q, k, v, _ = (_linear(attn, n, what) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    d = getattr(attn, "head_dim", None) or q.out_features // heads
    if q.out_features != heads * d or k.out_features != kv_heads * d or v.out_features != kv_heads * d:
        raise KVLayoutError(f"{what}: q/k/v_proj give {q.out_features}/{k.out_features}/{v.out_features} "
                            f"features, not {heads}/{kv_heads}/{kv_heads} heads of {d}")
    for name, p in attn.named_parameters():
        top = name.split(".")[0]
        if top in ("q_proj", "k_proj", "v_proj", "o_proj", "sinks") or p.numel() == d:
            continue
        raise KVLayoutError(f"{what}: parameter {name} of shape {tuple(p.shape)} spans all heads; tensor "
                            f"parallelism cannot split it without per-family code")
    return d


def _check_mlp(mlp: nn.Module, tp: TensorParallel, what: str) -> None:
    gate, up, _ = (_linear(mlp, n, what) for n in ("gate_proj", "up_proj", "down_proj"))
    if up.out_features % tp.size or gate.out_features != up.out_features:
        raise KVLayoutError(f"{what}: the MLP's intermediate size {up.out_features} cannot be split over "
                            f"tensor-parallel size {tp.size}")


def _shard_attention(attn: nn.Module, d: int, heads: int, kv_heads: int, tp: TensorParallel) -> None:
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    h0, h = query_head_range(tp.rank, tp.size, heads)
    k0, kh = kv_head_range(tp.rank, tp.size, kv_heads)
    _rows(q, h0 * d, (h0 + h) * d)
    _rows(k, k0 * d, (k0 + kh) * d)
    _rows(v, k0 * d, (k0 + kh) * d)
    _columns(o, h0 * d, (h0 + h) * d, tp)
    sinks = getattr(attn, "sinks", None)
    if sinks is not None:
        attn.sinks = nn.Parameter(sinks.data[h0:h0 + h].clone(), requires_grad=False)
    attn.num_key_value_groups = h // kh
    for name in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, h)
    if isinstance(getattr(attn, "num_key_value_heads", None), int):
        attn.num_key_value_heads = kh


def _shard_mlp(mlp: nn.Module, tp: TensorParallel) -> None:
    per = mlp.up_proj.out_features // tp.size
    lo, hi = tp.rank * per, (tp.rank + 1) * per
    _rows(mlp.gate_proj, lo, hi)
    _rows(mlp.up_proj, lo, hi)
    _columns(mlp.down_proj, lo, hi, tp)


def total_kv_heads(config) -> int:
    """The KV heads of a transformers config over all ranks."""
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def shard_model(hf_model: nn.Module, attention_modules: dict, tp: TensorParallel) -> None:
    """Keep rank ``tp.rank``'s part of every decoder layer of ``hf_model`` (see the module docstring);
    ``attention_modules``: the decoder's attention modules by layer index. Checks every layer before it
    changes any, so a refused model is left whole."""
    cfg = hf_model.config
    mt = cfg.model_type
    heads = int(cfg.num_attention_heads)
    kv_heads = total_kv_heads(cfg)
    query_head_range(tp.rank, tp.size, heads)
    kv_head_range(tp.rank, tp.size, kv_heads)
    plan = []
    for idx, attn in sorted(attention_modules.items()):
        what = f"{mt} layer {idx}"
        layer = next((m for m in hf_model.modules() if any(c is attn for c in m.children())), None)
        mlp = getattr(layer, "mlp", None) if layer is not None else None
        if mlp is None:
            raise KVLayoutError(f"{what}: the decoder layer has no 'mlp' module for tensor parallelism to shard")
        d = _check_attention(attn, heads, kv_heads, what)
        _check_mlp(mlp, tp, f"{what} MLP")
        plan.append((attn, mlp, d))
    for attn, mlp, d in plan:                       # every layer passed the checks above: now change them
        _shard_attention(attn, d, heads, kv_heads, tp)
        _shard_mlp(mlp, tp)
    hf_model._kvlayout_tp = (tp.rank, tp.size)
