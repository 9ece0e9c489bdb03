"""Transfer connectors that move whole cache blocks between engines (installed as kvlayout.connectors)."""

from .descriptors import TransferPlan, coalesce
from .nixl_connector import NixlConnector, PollResult, ReleasedBlocks, TransferInfo
from .record import CompatRecord, build_record, check_compatible, compare_records
from .regions import Region, layer_regions
from .schema import HandshakeError
from .topology import pair_regions

__all__ = ["CompatRecord", "HandshakeError", "NixlConnector", "PollResult", "Region", "ReleasedBlocks", "TransferInfo",
           "TransferPlan", "build_record", "check_compatible", "coalesce", "compare_records", "layer_regions",
           "pair_regions"]
