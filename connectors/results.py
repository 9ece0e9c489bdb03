"""What a connector reports to its engine: poll results, released blocks, and the cost of a finished load."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class ReleasedBlocks:
    """Blocks a prefill engine held for remote readers and may now free."""

    request_id: str
    block_ids: Any                  # as given to hold_blocks (list, or {kind: list})
    reason: str
    ok: bool                        # True when every reader reported a successful read


@dataclass
class PollResult:
    """What happened since the last poll.

    ``finished`` / ``failed`` (with reasons): requests whose blocks arrived here, or will not (pulled by a
    load, or pushed into a grant); a failed request's blocks are free again, no transfer can write them.
    ``released``: holds over (their blocks may be freed). ``pushed`` / ``push_failed``: this engine's pushes
    written, or given up (their source blocks may be freed either way)."""

    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    released: list[ReleasedBlocks] = field(default_factory=list)
    pushed: list[str] = field(default_factory=list)
    push_failed: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.finished or self.failed or self.released or self.pushed or self.push_failed)


@dataclass(frozen=True)
class TransferInfo:
    """Cost of one finished load: indices named, descriptors after coalescing (ours and, with telemetry,
    NIXL's count), bytes, time spent building indices (ours), in NIXL's prepare and post, and in total."""

    request_id: str
    engines: tuple[str, ...]
    num_indices: int
    num_descriptors: int
    nixl_descriptors: Optional[int]
    nbytes: int
    index_us: float
    nixl_prepare_us: float
    post_us: float
    seconds: float
