"""Halo (local) attention against dense global attention on the same feature map.

    python -m bench.attention [--sizes 16,32,64,128] [--dim 64] [--heads 4] [--block 8] [--halo 2]

For each map side: forward time and peak memory of our ``HaloAttention`` and of dense
multi-head attention over all positions (same width, torch's scaled_dot_product_attention),
their ratio, and time per pixel, which stays flat for local attention (linear in the number of
pixels) and grows for global attention (quadratic). Each measurement runs in a fresh process.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import in_fresh_process, machine, peak_rss_mb, table, timed


def dense_attention(x: torch.Tensor, heads: int, dim_head: int, proj) -> torch.Tensor:
    b, c, h, w = x.shape
    q, k, v = proj(x).reshape(b, 3, heads, dim_head, h * w).transpose(-1, -2).unbind(1)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(-1, -2).reshape(b, heads * dim_head, h, w)


def measure(kind: str, side: int, dim: int, heads: int, block: int, halo: int, batch: int) -> dict:
    from models.layers.halo_attention import HaloAttention

    torch.manual_seed(0)
    x = torch.randn(batch, dim, side, side)
    base = peak_rss_mb()
    with torch.inference_mode():
        if kind == "halo":
            layer = HaloAttention(dim, heads, dim // heads, block, halo).eval()
            seconds = timed(lambda: layer(x), repeats=3)
        else:
            proj = torch.nn.Conv2d(dim, 3 * dim, 1, bias=False)
            seconds = timed(lambda: dense_attention(x, heads, dim // heads, proj), repeats=3)
    return {"seconds": seconds, "peak_mb": peak_rss_mb() - base}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="16,32,64,128")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--halo", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    a = p.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"map [B={a.batch}, C={a.dim}, S, S], {a.heads} heads, halo block {a.block}, halo {a.halo}\n")
    rows = []
    for side in [int(s) for s in a.sizes.split(",")]:
        halo = in_fresh_process(measure, "halo", side, a.dim, a.heads, a.block, a.halo, a.batch)
        dense = in_fresh_process(measure, "dense", side, a.dim, a.heads, a.block, a.halo, a.batch)
        pixels = side * side
        rows.append({"side": side, "pixels": pixels, "halo_ms": 1e3 * halo["seconds"],
                     "dense_ms": 1e3 * dense["seconds"], "dense/halo": dense["seconds"] / halo["seconds"],
                     "halo_us/px": 1e6 * halo["seconds"] / pixels, "dense_us/px": 1e6 * dense["seconds"] / pixels,
                     "halo_peak_MB": halo["peak_mb"], "dense_peak_MB": dense["peak_mb"]})
    print(table(rows))
    first, last = rows[0], rows[-1]
    growth = last["pixels"] / first["pixels"]
    print(f"\nsummary: {growth:.0f}x more pixels -> halo attention {last['halo_ms'] / first['halo_ms']:.1f}x the time, "
          f"dense attention {last['dense_ms'] / first['dense_ms']:.1f}x; at {last['side']}x{last['side']} halo is "
          f"{last['dense/halo']:.1f}x faster than dense")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
