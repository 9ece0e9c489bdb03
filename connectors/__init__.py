"""Transfer connectors that move whole cache blocks between engines (installed as kvlayout.connectors)."""

from .handshake import CompatRecord, HandshakeError, build_record, check_compatible, compare_records
from .nixl_connector import NixlConnector, PollResult, ReleasedBlocks, TransferInfo
from .topology import Region, TransferPlan, coalesce, kv_regions, layer_regions, pair_regions
