"""Block-sparse decode's page table in one Triton launch: the selected pages of each request as a block table
of their own, and the keys each request sees in them (``kvlayout.sparse_decode.selected_pages`` is the
PyTorch form; this kernel does the same in one launch instead of eight small ops, which on a host-bound
decode step each cost a launch).

Program ``r`` walks request ``r``'s row of ``selected [B, S]`` in chunks of ``BLOCK``: entry ``i >= 0``
becomes ``table[r, i] = block_table[r, selected[r, i]]`` and adds ``min(PAGE, seq_len - selected[r, i] *
PAGE)`` keys (clamped at 0); an entry of -1 writes page 0's block and adds nothing. It also writes
``rows[r] = r`` (and ``rows[B] = B``): the query start of each request's one token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _selected_pages_kernel(bt_ptr, seq_lens_ptr, sel_ptr, table_ptr, lens_ptr, rows_ptr, num_sel, num_reqs,
                           stride_bt, stride_btc, stride_sel, stride_selc, stride_table,
                           PAGE: tl.constexpr, BLOCK: tl.constexpr):
    req = tl.program_id(0)
    seq_len = tl.load(seq_lens_ptr + req).to(tl.int64)
    bt_row = bt_ptr + req.to(tl.int64) * stride_bt
    total = tl.zeros([BLOCK], tl.int64)
    for start in range(0, num_sel, BLOCK):
        i = start + tl.arange(0, BLOCK)
        in_row = i < num_sel
        sel = tl.load(sel_ptr + req.to(tl.int64) * stride_sel + i * stride_selc, mask=in_row,
                      other=-1).to(tl.int64)
        valid = sel >= 0
        page = tl.where(valid, sel, 0)
        blk = tl.load(bt_row + page * stride_btc, mask=in_row, other=0)
        tl.store(table_ptr + req.to(tl.int64) * stride_table + i, blk.to(tl.int32), mask=in_row)
        keys = tl.minimum(tl.maximum(seq_len - page * PAGE, 0), PAGE)
        total += tl.where(valid, keys, 0)
    tl.store(lens_ptr + req, tl.sum(total, 0).to(tl.int32))
    tl.store(rows_ptr + req, req)
    if req == 0:
        tl.store(rows_ptr + num_reqs, num_reqs)


def selected_pages_launch(block_table: torch.Tensor, seq_lens: torch.Tensor, selected: torch.Tensor, page: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(table [B, S] int32, lens [B] int32, rows [B + 1] int32)`` of the selected pages (see the module
    docstring) in one launch. Inputs are trusted (``kvlayout.sparse_decode`` validates)."""
    b, s = selected.shape
    dev = selected.device
    table = torch.empty(b, s, dtype=torch.int32, device=dev)
    lens = torch.empty(b, dtype=torch.int32, device=dev)
    rows = torch.empty(b + 1, dtype=torch.int32, device=dev)
    if b == 0:
        rows.zero_()
        return table, lens, rows
    block = min(1024, triton.next_power_of_2(max(s, 1)))
    _selected_pages_kernel[(b,)](block_table, seq_lens, selected, table, lens, rows, s, b, block_table.stride(0),
                                 block_table.stride(1), selected.stride(0), selected.stride(1), table.stride(0),
                                 PAGE=page, BLOCK=block, num_warps=4)
    return table, lens, rows
