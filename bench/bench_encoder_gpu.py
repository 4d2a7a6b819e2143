"""The whole JinaBERT encoder on a GPU: packed varlen batches + Triton kernels vs padded eager attention.

A jina-embeddings-v2-base-shaped model (768 hidden, 12 layers, 12 heads, GEGLU 3072) with random
weights in bf16, on random token ids:
  (a) 1000 documents with log-uniform lengths in [16, 8192] tokens;
  (b) 64 documents of 8192 tokens.
- `ours`: encoder.jina_bert.JinaBert on packed batches (encoder.batching: length-sorted, cut by a
  token budget), attention and pooling through triton_kernels (Triton on CUDA), mean pool + L2 norm.
- `padded eager`: the same weights run the way the reference implementation (and HF-style code) does:
  length-sorted batches padded to their longest member, a dense (heads, L, L) ALiBi bias plus padding
  mask added to materialised scores, softmax, mean pooling over the mask.
Reports tokens/s (real tokens only), peak memory, the speed-up, the minimum cosine between the two
paths' vectors, and ours' peak memory for one document of 1024..8192 tokens (should grow linearly).

    .venv/bin/python bench/bench_encoder_gpu.py
    .venv/bin/python bench/bench_encoder_gpu.py --docs 200 --budget 32768   # a quicker run
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F


def require_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit(
            "bench_encoder_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run."
        )
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench_encoder_gpu.py needs the `triton` package (pip install 'longembed[gpu]').")


def random_docs(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        length = (
            low
            if low == high
            else int(math.exp(torch.empty(1).uniform_(math.log(low), math.log(high), generator=gen).item()))
        )
        docs.append(torch.randint(1000, vocab, (length,), generator=gen).tolist())
    return docs


@torch.inference_mode()
def embed_packed(model, docs: list[list[int]], budget: int, device: torch.device) -> torch.Tensor:
    from longembed import triton_kernels
    from longembed.encoder.batching import Sequence, pack, plan_batches

    out = torch.empty((len(docs), model.config.hidden_size), dtype=torch.float32, device=device)
    for batch_ids in plan_batches([len(d) for d in docs], budget):
        batch = pack([Sequence(docs[i], [(0, len(docs[i]))], [i]) for i in batch_ids], device)
        hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        out[batch.outputs] = triton_kernels.mean_pool_normalize(hidden, batch.pool_spans)
    return out


def padded_layer(layer, x: torch.Tensor, key_mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One JinaBERT layer on (B, L, hidden) with eager attention over materialised scores."""
    att, mlp = layer.attention, layer.mlp
    b, length, hidden = x.shape
    heads = att.heads
    q, k, v = att.qkv(x).view(b, length, 3, heads, hidden // heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hidden // heads) + bias + key_mask  # (B, h, L, L)
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, length, hidden)
    x = att.norm(att.dense(ctx) + x)
    return mlp(x)


@torch.inference_mode()
def embed_padded(
    model, docs: list[list[int]], budget: int, score_budget: int, device: torch.device
) -> torch.Tensor:
    """Length-sorted padded batches: at most `budget` padded tokens and `score_budget` score elements."""
    heads = model.config.num_attention_heads
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]), reverse=True)
    out = torch.empty((len(docs), model.config.hidden_size), dtype=torch.float32, device=device)
    slopes = model.slopes.to(device)
    i = 0
    while i < len(order):
        length = len(docs[order[i]])
        size = max(1, min(budget // length, score_budget // (heads * length * length)))
        idx = order[i : i + size]
        i += size
        ids = torch.zeros((len(idx), length), dtype=torch.long)
        valid = torch.zeros((len(idx), length), dtype=torch.bool)
        for row, j in enumerate(idx):
            ids[row, : len(docs[j])] = torch.tensor(docs[j])
            valid[row, : len(docs[j])] = True
        ids, valid = ids.to(device), valid.to(device)
        x = model.embedding_norm(model.word_embeddings(ids) + model.token_type_embeddings.weight[0])
        pos = torch.arange(length, device=device)
        bias = (-slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs()).to(x.dtype)  # (h, L, L)
        key_mask = torch.zeros(valid.shape, dtype=x.dtype, device=device).masked_fill_(~valid, float("-inf"))
        key_mask = key_mask[:, None, None, :]
        for layer in model.layers:
            x = padded_layer(layer, x, key_mask, bias)
        summed = (x.float() * valid[..., None]).sum(1)
        out[idx] = F.normalize(summed / valid.sum(1, keepdim=True), dim=-1)
    return out


def timed(fn) -> tuple[torch.Tensor, float, float]:
    """(result, seconds, peak GiB) of one run after a warm-up run."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def compare(name: str, model, docs: list[list[int]], args, device: torch.device) -> None:
    tokens = sum(len(d) for d in docs)
    ours, t_ours, mem_ours = timed(lambda: embed_packed(model, docs, args.budget, device))
    try:
        ref, t_ref, mem_ref = timed(lambda: embed_padded(model, docs, args.budget, args.score_budget, device))
    except torch.OutOfMemoryError:
        ref, t_ref, mem_ref = None, float("nan"), float("nan")
        torch.cuda.empty_cache()
    print(f"\n### {name}: {len(docs)} documents, {tokens} tokens (max {max(len(d) for d in docs)})")
    print("| path | seconds | tokens/s | peak GiB |")
    print("|---|---|---|---|")
    print(f"| ours (packed + Triton) | {t_ours:.2f} | {tokens / t_ours:,.0f} | {mem_ours:.2f} |")
    print(f"| padded eager + dense ALiBi | {t_ref:.2f} | {tokens / t_ref:,.0f} | {mem_ref:.2f} |")
    if ref is not None:
        cos = (ours * ref).sum(-1)
        print(f"speed-up {t_ref / t_ours:.2f}x; min cosine ours vs padded eager {cos.min().item():.5f}")


def memory_by_length(model, device: torch.device) -> None:
    print("\n### ours, peak memory for one document (activations above the weights)")
    print("| tokens | peak MiB above weights |")
    print("|---|---|")
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    for n in (1024, 2048, 4096, 8192):
        docs = random_docs(1, n, n, model.config.vocab_size, seed=n)
        _, _, peak = timed(lambda docs=docs, n=n: embed_packed(model, docs, n, device))
        print(f"| {n} | {(peak * 2**30 - weights) / 2**20:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=1000, help="mixed-length documents in case (a)")
    parser.add_argument("--long-docs", type=int, default=64, help="8192-token documents in case (b)")
    parser.add_argument(
        "--budget", type=int, default=65536, help="tokens per batch (padded tokens for eager)"
    )
    parser.add_argument("--score-budget", type=int, default=2**31, help="eager: max B*heads*L*L per batch")
    args = parser.parse_args()
    require_cuda()
    import triton

    from longembed.encoder.jina_bert import JinaBert, JinaBertConfig
    from longembed.triton_kernels import dispatch

    device = torch.device("cuda")
    torch.manual_seed(0)
    config = JinaBertConfig()  # jina-embeddings-v2-base-en shape
    model = JinaBert(config).to(device=device, dtype=torch.bfloat16).eval()
    print(
        f"GPU: {torch.cuda.get_device_name(device)}; torch {torch.__version__}, triton {triton.__version__}"
    )
    print(f"kernels backend: {dispatch.backend(device)}; bf16 jina-base shape, random weights")
    print(f"command: {' '.join(sys.argv)}")
    vocab = config.vocab_size
    compare("(a) mixed lengths 16-8192", model, random_docs(args.docs, 16, 8192, vocab, seed=1), args, device)
    compare(
        "(b) 8192-token documents",
        model,
        random_docs(args.long_docs, 8192, 8192, vocab, seed=2),
        args,
        device,
    )
    memory_by_length(model, device)


if __name__ == "__main__":
    main()
