"""2-D halo attention: each block of queries attends to the block and a halo around it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ConfigError

def positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_halo_geometry(block: int, halo: int, where: str = "HaloAttention") -> None:
    """Raise ConfigError for block/halo values that define no valid halo attention."""
    if not isinstance(block, int) or block < 1:
        raise ConfigError(f"{where}: block={block!r} must be an integer >= 1 (side of the query blocks)")
    if not isinstance(halo, int) or halo < 0:
        raise ConfigError(f"{where}: halo={halo!r} must be an integer >= 0 (0 = attention within the block only)")
    if halo > block:
        # The halo is the overlap into the neighbouring blocks; wider context is what a larger
        # block gives, at a lower cost per covered pixel ((b + 2h)^2 keys for b^2 queries).
        raise ConfigError(f"{where}: halo={halo} exceeds block={block}; the halo is the overlap into the "
                          f"neighbouring blocks, so choose 0 <= halo <= block (or a larger block)")


class HaloAttention(nn.Module):
    """Multi-head 2-D halo attention (Vaswani et al., "Scaling local self-attention", 2021).

    The map is cut into ``block x block`` query blocks (padded at the bottom/right to a
    multiple of the block); each block attends to the ``(block + 2 halo)^2`` window centred on
    it. Keys outside the map (padding) are masked out, so near the border a query attends to
    the window clipped to the map. Position enters through learned relative embeddings, one
    table for row offsets and one for column offsets, read by the query:
    ``logit(q, k) = s * q.k + s * q.R_row[dy] + s * q.R_col[dx]`` with ``s = dim_head^-0.5`` and
    ``(dy, dx)`` the offset of the key from the query. Input/output ``[B, dim, H, W]``.
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 16, block: int = 8, halo: int = 2):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("dim_head", dim_head)):
            if not positive_int(value):
                raise ConfigError(f"HaloAttention: {name}={value!r} must be a positive integer")
        check_halo_geometry(block, halo)
        self.heads, self.dim_head, self.block, self.halo = heads, dim_head, block, halo
        self.window = block + 2 * halo
        self.scale = dim_head ** -0.5
        inner = heads * dim_head
        self.to_q = nn.Conv2d(dim, inner, 1, bias=False)
        self.to_kv = nn.Conv2d(dim, 2 * inner, 1, bias=False)
        self.to_out = nn.Conv2d(inner, dim, 1)
        # offsets key - query along one axis span -(block + halo - 1) .. block + halo - 1
        self.max_offset = block + halo - 1
        self.rel_rows = nn.Parameter(torch.randn(2 * self.max_offset + 1, dim_head) * self.scale)
        self.rel_cols = nn.Parameter(torch.randn(2 * self.max_offset + 1, dim_head) * self.scale)
        # rel_index[i, u]: table row for query i of a block and key u of its window
        index = torch.arange(self.window)[None, :] - halo - torch.arange(block)[:, None] + self.max_offset
        self.register_buffer("rel_index", index, persistent=False)
        # key (u, v) of a window -> [one-hot of its row u, one-hot of its column v]; see forward
        eye = torch.eye(self.window)
        key_position = torch.cat([eye.repeat_interleave(self.window, 0), eye.repeat(self.window, 1)], 1)
        self.register_buffer("key_position", key_position, persistent=False)

    def _windows(self, t: Tensor, pad_h: int, pad_w: int) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, C, nh, nw, window, window]``: the halo window of every block."""
        h = self.halo
        t = F.pad(t, (h, h + pad_w, h, h + pad_h))
        return t.unfold(2, self.window, self.block).unfold(3, self.window, self.block)

    def _outside_bias(self, height: int, width: int, nh: int, nw: int, dtype, device) -> tuple[Tensor, Tensor]:
        """Very negative logit terms for the window rows and columns that fall outside the map.

        A key is outside iff its row or its column is, so the mask rides on the row and column
        logits: ``[nh, 1, 1, 1, window]`` for rows, ``[1, nw, 1, 1, window]`` for columns. Half
        the dtype's minimum each: a key outside on both axes still gets a finite sum, and its
        softmax weight is exactly 0 whatever the other terms.
        """
        offsets = torch.arange(self.window, device=device) - self.halo
        row = torch.arange(nh, device=device)[:, None] * self.block + offsets
        col = torch.arange(nw, device=device)[:, None] * self.block + offsets
        very_negative = torch.finfo(dtype).min / 2
        row_bias = torch.where((row < 0) | (row >= height), very_negative, 0.0).to(dtype)
        col_bias = torch.where((col < 0) | (col >= width), very_negative, 0.0).to(dtype)
        return row_bias[:, None, None, None, :], col_bias[None, :, None, None, :]

    def forward(self, x: Tensor) -> Tensor:
        bsz, _, height, width = x.shape
        b, w, nhead, d = self.block, self.window, self.heads, self.dim_head
        nh, nw = -(-height // b), -(-width // b)
        pad_h, pad_w = nh * b - height, nw * b - width
        blocks = nh * nw

        q = F.pad(self.to_q(x) * self.scale, (0, pad_w, 0, pad_h))
        q = q.view(bsz, nhead, d, nh, b, nw, b).permute(0, 1, 3, 5, 4, 6, 2)
        q = q.reshape(bsz, nhead, blocks, b, b, d)                          # [B, n, L, i, j, d]
        k, v = self._windows(self.to_kv(x), pad_h, pad_w).chunk(2, dim=1)   # [B, n*d, nh, nw, u, v]
        k = k.reshape(bsz, nhead, d, blocks, w * w).permute(0, 1, 3, 4, 2)  # [B, n, L, u*v, d]
        v = v.reshape(bsz, nhead, d, blocks, w * w).permute(0, 1, 3, 4, 2)

        rows = torch.einsum("bnlijd,iud->bnliju", q, self.rel_rows[self.rel_index])
        cols = torch.einsum("bnlijd,jvd->bnlijv", q, self.rel_cols[self.rel_index])
        outside_rows, outside_cols = self._outside_bias(height, width, nh, nw, rows.dtype, rows.device)
        rows = (rows.view(bsz, nhead, nh, nw, b, b, w) + outside_rows).view(bsz, nhead, blocks, b, b, w)
        cols = (cols.view(bsz, nhead, nh, nw, b, b, w) + outside_cols).view(bsz, nhead, blocks, b, b, w)
        # One product gives q.k + rows[u] + cols[v]: queries carry their relative logits, keys the
        # one-hot of their row and column. Adding rows and cols (and a mask) onto the logits
        # instead costs broadcast passes over them and, in the backward pass, copies of the whole
        # logits tensor (~30 % slower training).
        q = torch.cat([q, rows, cols], dim=-1).reshape(bsz, nhead, blocks, b * b, d + 2 * w)
        k = torch.cat([k, self.key_position.to(k.dtype).expand(bsz, nhead, blocks, -1, -1)], dim=-1)
        out = (q @ k.transpose(-1, -2)).softmax(dim=-1) @ v                # [B, n, L, i*j, d]

        out = out.view(bsz, nhead, nh, nw, b, b, d).permute(0, 1, 6, 2, 4, 3, 5)
        out = out.reshape(bsz, nhead * d, nh * b, nw * b)[:, :, :height, :width]
        return self.to_out(out)
