"""CPU ALiBi attention at long lengths: longembed's PyTorch path vs SDPA with a float ALiBi mask.

    .venv/bin/python bench/bench_alibi_cpu.py [--lengths 2048 8192] [--repeats 2]

jina-base shape (12 heads, head_dim 64), fp32, one sequence, one layer's attention. Peers in the same
process: SDPA with the ALiBi bias as a float mask, built per block of queries of the same size as
ours (the dense (heads, n, n) mask alone would need 3 GiB at 8192), and SDPA without any bias (the
speed ceiling: no ALiBi at all).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from longembed.encoder.jina_bert import alibi_slopes
from longembed.triton_kernels import torch_ops


def sdpa_masked(q, k, v, slopes, scale):
    """(heads, n, d): SDPA with a float ALiBi mask per block of queries (the peer)."""
    heads, n, _ = q.shape
    block = max(1, torch_ops._BLOCK_ELEMENTS // (heads * n))
    pos = torch.arange(n)
    out = torch.empty_like(q)
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        bias = -slopes[:, None, None] * (pos[b0:b1, None] - pos[None, :]).abs().float()
        out[:, b0:b1] = F.scaled_dot_product_attention(q[:, b0:b1], k, v, attn_mask=bias, scale=scale)
    return out


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def row(n: int, heads: int, head_dim: int, repeats: int) -> str:
    slopes, scale = alibi_slopes(heads), head_dim**-0.5
    q, k, v = (torch.randn(n, heads, head_dim) for _ in range(3))
    cu = torch.tensor([0, n], dtype=torch.int32)
    qh, kh, vh = (t.transpose(0, 1).contiguous() for t in (q, k, v))

    def ours():
        return torch_ops.varlen_attention_torch(q, k, v, cu, n, slopes, scale)

    def peer():
        return sdpa_masked(qh, kh, vh, slopes, scale)

    def ceiling():
        return torch_ops.varlen_attention_torch(q, k, v, cu, n, None, scale)

    t_ours, t_peer, t_ceiling = best(ours, repeats), best(peer, repeats), best(ceiling, repeats)
    diff = (ours().transpose(0, 1) - peer()).abs().max().item()
    return (
        f"| {n} | {t_ours:.3f} s | {t_peer:.3f} s | {t_peer / t_ours:.2f}x | {t_ceiling:.3f} s | {diff:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    heads, head_dim = 12, 64
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {heads} heads x {head_dim}")
    print("| tokens | longembed ALiBi | SDPA + float ALiBi mask | ratio | SDPA, no bias | max abs diff |")
    print("|---|---|---|---|---|---|")
    for n in args.lengths:
        print(row(n, heads, head_dim, args.repeats))


if __name__ == "__main__":
    main()
