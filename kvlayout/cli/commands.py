"""The ``kvlayout`` command. ``kvlayout plan MODEL`` prints the cache plan for a model."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Optional, Sequence

from ..errors import KVLayoutError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40,
          "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(text: str) -> int:
    """``"40GiB"`` -> 42949672960; plain numbers are bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size; write e.g. 40GiB, 512MiB or 1e9")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def _cmd_plan(args: argparse.Namespace) -> int:
    from ..hf_config import load_hf_config, specs_from_hf_config
    from ..planner import plan_kv_cache

    cfg = load_hf_config(args.model)
    specs = specs_from_hf_config(cfg, kv_dtype=args.kv_dtype, block_size=args.block_size, tp_size=args.tp,
                                 mamba_ssm_dtype=args.mamba_ssm_dtype)
    plan = plan_kv_cache(specs, args.memory, backend=args.backend, cross_layer=args.cross_layer or None)
    if args.context < 1:
        raise KVLayoutError(f"--context must be at least 1 token, got {args.context}")
    if args.json:
        print(plan.to_json(context_tokens=args.context))
    else:
        print(f"model {args.model}: {len(specs)} cache layers, tensor-parallel size {args.tp} (per-rank plan)")
        print(plan.describe(context_tokens=args.context))
    return 0


def _add_plan(sub) -> None:
    from ..hf_config import shipped_models

    p = sub.add_parser("plan", help="print the KV-cache plan for a model",
                       description="Resolve the cache layout for a model and print one row per group of "
                                   "layers sharing a block table, then its capacity: concurrent requests at "
                                   "--context tokens, or the longest single request. Shipped models: "
                                   + ", ".join(shipped_models()))
    p.add_argument("model", help="a shipped model name or a Hugging Face config.json (file or folder)")
    p.add_argument("--memory", type=parse_size, default=parse_size("40GiB"),
                   help="KV-cache memory budget per GPU (default 40GiB)")
    p.add_argument("--kv-dtype", default="auto", help="auto (the model's dtype), bf16, fp16, fp32, fp8, fp8_e5m2")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--mamba-ssm-dtype", default="float32", help="dtype of Mamba SSM states (default float32)")
    p.add_argument("--backend", default=None,
                   help="check the plan against this attention backend's limits (torch, triton, ...)")
    p.add_argument("--cross-layer", action="store_true", help="one allocation per group, blocks of all layers together")
    p.add_argument("--context", type=int, default=8192,
                   help="context length (tokens per request) at which to count concurrent requests (default 8192)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (capacity under \"capacity\")")
    p.set_defaults(func=_cmd_plan)


def _add_demo(sub) -> None:
    from .demo import add_parser
    add_parser(sub)


def _add_bench(sub) -> None:
    from .bench import add_parser
    add_parser(sub)


# Each subcommand module adds its parser; keep this list the one place that names them.
SUBCOMMANDS: list[Callable] = [_add_plan, _add_demo, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="kvlayout", description="KV-cache layout subsystem for LLM inference")
    parser.add_argument("--version", action="version", version=f"kvlayout {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KVLayoutError as e:
        print(f"kvlayout: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
