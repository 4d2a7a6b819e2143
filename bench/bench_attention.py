"""Attention alone on a GPU: our Triton varlen ALiBi kernel vs PyTorch's attention paths.

jina-embeddings-v2-base shape (12 heads, head_dim 64), bf16, bidirectional. Providers:
- `triton`: triton_kernels.flash_attention.alibi_flash_attention on the packed batch, bias in-kernel;
- `sdpa+bias`: F.scaled_dot_product_attention with a materialised ALiBi bias (built once for the longest
  length and sliced, as Jina's reference model caches it), one call per equal-length group;
- `flex`: FlexAttention (torch.compile'd) on the packed batch, ALiBi as a score_mod and a same-document
  block mask;
- `sdpa`: SDPA without bias (flash backend): the no-ALiBi speed ceiling, not a like-for-like peer.
Each case: time (median of triton.testing.do_bench), TFLOP/s from 4 * n^2 * head_dim * heads per
sequence, the fraction of the GPU's dense bf16 peak, peak memory above the inputs, and ratios.

    .venv/bin/python bench/bench_attention.py                 # all cases
    .venv/bin/python bench/bench_attention.py --cases 8192    # one case
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM = 12, 64
TOKENS_PER_CASE = 65536  # each fixed-length case packs this many tokens (64 x 1024 ... 8 x 8192)
# Dense bf16 tensor-core peaks (no sparsity), by device name substring.
DENSE_BF16_PEAK = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100": 989e12,
                   "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}  # fmt: skip


def require_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench_attention.py needs the `triton` package (pip install 'longembed[gpu]').")


def peak_flops(name: str) -> float | None:
    return next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)


def alibi_slopes(heads: int) -> torch.Tensor:
    from longembed.encoder.jina_bert import alibi_slopes as slopes

    return slopes(heads)


def mixed_lengths(seed: int = 0, total: int = TOKENS_PER_CASE) -> list[int]:
    """Log-uniform lengths in [16, 8192] until `total` tokens: a few long documents, many short ones."""
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(
            int(math.exp(torch.empty(1).uniform_(math.log(16), math.log(8192), generator=gen).item()))
        )
    return lengths


def make_inputs(lengths: list[int], device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    total = sum(lengths)
    q, k, v = (
        torch.randn(total, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
        for _ in range(3)
    )
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


def groups_by_length(lengths: list[int]) -> dict[int, list[int]]:
    """Sequence indices grouped by equal length, so SDPA runs batched where it can."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return groups


def sdpa_provider(q, k, v, cu, lengths: list[int], slopes: torch.Tensor | None) -> Callable[[], None]:
    """Per equal-length group: (b, heads, n, d) SDPA, with a dense ALiBi bias when slopes are given.

    Like the reference implementation, the bias is built once for the longest length, (1, heads, L, L),
    and sliced per group; inputs are regrouped before timing. Both count in the peak memory.
    """
    starts = cu[:-1].tolist()
    bias = None
    if slopes is not None:
        pos = torch.arange(max(lengths), device=q.device)
        bias = (-slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs().float()).to(q.dtype).unsqueeze(0)
    plan = []
    for n, idx in groups_by_length(lengths).items():
        rows = torch.cat([torch.arange(starts[i], starts[i] + n, device=q.device) for i in idx])
        qkv = [t[rows].view(len(idx), n, HEADS, HEAD_DIM).transpose(1, 2) for t in (q, k, v)]
        plan.append((qkv, None if bias is None else bias[:, :, :n, :n]))

    def run() -> None:
        for (qb, kb, vb), mask in plan:
            F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)

    return run


def flex_provider(q, k, v, cu, slopes: torch.Tensor) -> Callable[[], None]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    total = q.shape[0]
    doc = torch.repeat_interleave(
        torch.arange(len(cu) - 1, device=q.device), (cu[1:] - cu[:-1]).long(), output_size=total
    )

    def same_doc(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def alibi(score, b, h, q_idx, kv_idx):
        # Packed positions: within one document |q_idx - kv_idx| is the in-document distance.
        return score - slopes[h] * (q_idx - kv_idx).abs()

    block_mask = create_block_mask(same_doc, None, None, total, total, device=q.device, _compile=True)
    flex = torch.compile(flex_attention, dynamic=False)
    qf, kf, vf = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, T, d)
    return lambda: flex(qf, kf, vf, score_mod=alibi, block_mask=block_mask)


def measure(fn: Callable[[], object], baseline: int) -> tuple[float, float]:
    """(median ms, peak MiB above `baseline`)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    return triton.testing.do_bench(fn, warmup=25, rep=200), peak


def run_case(name: str, lengths: list[int], device: torch.device, peak: float | None) -> None:
    from longembed.triton_kernels.flash_attention import alibi_flash_attention

    q, k, v, cu = make_inputs(lengths, device)
    slopes = alibi_slopes(HEADS).to(device)
    flops = sum(4 * n * n * HEAD_DIM * HEADS for n in lengths)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    providers: dict[str, Callable[[], object]] = {
        "triton": lambda: alibi_flash_attention(q, k, v, cu, max(lengths), slopes),
        "sdpa+bias": sdpa_provider(q, k, v, cu, lengths, slopes),
        "flex": flex_provider(q, k, v, cu, slopes),
        "sdpa (no bias)": sdpa_provider(q, k, v, cu, lengths, None),
    }
    ours = alibi_flash_attention(q, k, v, cu, max(lengths), slopes).float()
    results = {}
    for pname, fn in providers.items():
        try:
            results[pname] = measure(fn, baseline)
        except torch.OutOfMemoryError:
            results[pname] = None
            torch.cuda.empty_cache()
    print(f"\n### {name}: {len(lengths)} sequences, {sum(lengths)} tokens, max {max(lengths)}, "
          f"{flops / 1e12:.3f} TFLOP")  # fmt: skip
    print("| provider | ms | TFLOP/s | % dense bf16 peak | peak MiB | triton speed-up |")
    print("|---|---|---|---|---|---|")
    t_ours = results["triton"][0] if results["triton"] else float("nan")
    for pname, res in results.items():
        if res is None:
            print(f"| {pname} | OOM | | | | |")
            continue
        ms, mib = res
        tflops = flops / (ms * 1e-3) / 1e12
        frac = f"{tflops * 1e12 / peak:.1%}" if peak else "n/a"
        print(f"| {pname} | {ms:.3f} | {tflops:.1f} | {frac} | {mib:.0f} | {ms / t_ours:.2f}x |")
    # Numerical agreement with an independent path (SDPA + dense bias on the longest sequence).
    n = max(lengths)
    i = lengths.index(n)
    s = int(cu[i])
    seg = [t[s : s + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
    pos = torch.arange(n, device=device)
    bias = (-slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs().float()).unsqueeze(0)
    ref = F.scaled_dot_product_attention(*(t.float() for t in seg), attn_mask=bias)[0].transpose(0, 1)
    err = (ours[s : s + n] - ref).abs().max().item()
    print(f"max |triton - fp32 SDPA+bias| on the longest sequence: {err:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="*", default=["512", "2048", "8192", "mixed"])
    args = parser.parse_args()
    require_cuda()
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name)
    import triton

    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (add it to DENSE_BF16_PEAK)"
    print(f"GPU: {name}; dense bf16 peak {peak_text}; torch {torch.__version__}, triton {triton.__version__}")
    print(f"heads={HEADS}, head_dim={HEAD_DIM}, bf16")
    print(f"command: {' '.join(sys.argv)}")
    for case in args.cases:
        if case == "mixed":
            run_case("mixed lengths 16-8192 (log-uniform)", mixed_lengths(), device, peak)
        else:
            n = int(case)
            run_case(f"{TOKENS_PER_CASE // n} x {n}", [n] * (TOKENS_PER_CASE // n), device, peak)


if __name__ == "__main__":
    main()
