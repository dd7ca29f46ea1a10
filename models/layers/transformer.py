"""Post-norm Transformer encoder and decoder layers with a learned 2-D positional embedding."""

from __future__ import annotations

import torch
from torch import Tensor, nn

class PositionalEmbedding2d(nn.Module):
    """Learned 2-D positional embedding: half the channels index the column, half the row."""

    def __init__(self, height: int, width: int, dim: int):
        super().__init__()
        self.height, self.width = height, width
        self.rows = nn.Parameter(torch.rand(height, dim // 2))
        self.cols = nn.Parameter(torch.rand(width, dim - dim // 2))

    def forward(self) -> Tensor:
        rows = self.rows[:, None, :].expand(self.height, self.width, -1)
        cols = self.cols[None, :, :].expand(self.height, self.width, -1)
        return torch.cat([cols, rows], dim=-1).reshape(self.height * self.width, -1)


def feed_forward(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, dim))


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer; positions are added to queries and keys (DETR style)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = feed_forward(dim, ffn_dim, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        qk = x + pos
        x = self.norm1(x + self.drop1(self.attn(qk, qk, x, need_weights=False)[0]))
        return self.norm2(x + self.drop2(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Post-norm layer: self-attention, then cross-attention to quantised levels, then FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = feed_forward(dim, ffn_dim, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor, memory: Tensor, memory_pos: Tensor) -> Tensor:
        qk = x + pos
        x = self.norm1(x + self.drop1(self.self_attn(qk, qk, x, need_weights=False)[0]))
        attended = self.cross_attn(x + pos, memory + memory_pos, memory, need_weights=False)[0]
        x = self.norm2(x + self.drop2(attended))
        return self.norm3(x + self.drop3(self.ffn(x)))


def decoder_memory_groups(num_memories: int, num_layers: int) -> list[list[int]]:
    """Which quantised levels each decoder layer cross-attends to.

    With as many layers as levels (the original: 4 and 4) layer i attends to level i; with more
    layers, consecutive layers share a level; with fewer, each layer attends to a contiguous
    group of levels (concatenated along the tokens), so that every level is used.
    """
    if num_layers >= num_memories:
        return [[i * num_memories // num_layers] for i in range(num_layers)]
    bounds = [round(i * num_memories / num_layers) for i in range(num_layers + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(num_layers)]
