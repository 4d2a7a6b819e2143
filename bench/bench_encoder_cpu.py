"""CPU encoder throughput: longembed vs sentence-transformers on the same model and the same texts.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_encoder_cpu.py [--texts 1000] [--repeats 2]

Both run in this process, interleaved, best of `repeats`; tokens/s counts real tokens only
(special tokens included, padding excluded), so the padded peer is not credited for padding.
The fraction of peak uses this machine's matmul peak, measured here at the start, and the model's
FLOPs per real token (linear layers + attention scores and values).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from longembed.encoder import load_model


def mixed_length_texts(n: int, seed: int = 0) -> list[str]:
    """Real prose and code (standard library docstrings) cut at log-uniform lengths, 10..2000 chars:
    from a few tokens to past the 256-token limit."""
    import importlib
    import inspect

    docs = []
    for name in (
        "json",
        "os",
        "re",
        "argparse",
        "collections",
        "pathlib",
        "subprocess",
        "logging",
        "email",
        "http.client",
        "sqlite3",
        "decimal",
        "difflib",
        "shutil",
        "tempfile",
    ):
        module = importlib.import_module(name)
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and len(doc) > 200:
                docs.append(" ".join(doc.split()))
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(10), np.log(2000), size=n)).astype(int)
    texts = []
    for i, length in enumerate(lengths):
        doc = docs[i % len(docs)]
        while len(doc) < length:
            doc = doc + " " + docs[(i * 7 + len(doc)) % len(docs)]
        texts.append(doc[:length])
    return texts


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops_per_token(config, seq_lengths: list[int]) -> float:
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    linear = 2 * (4 * h * h + 2 * h * i)  # QKV + output projection, MLP up + down
    # Per token: scores against every key of its own sequence and the weighted sum of values.
    attention = 4 * h * float(np.sum(np.square(seq_lengths))) / float(np.sum(seq_lengths))
    return layers * (linear + attention)


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="sentence-transformers batch size")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    texts = mixed_length_texts(args.texts)
    ours32 = load_model(device="cpu", dtype="fp32")
    lengths = [min(n, ours32.info.max_tokens - 2) + 2 for n in ours32.count_tokens(texts)]
    n_tokens = sum(lengths)
    fpt = flops_per_token(ours32._m.config, lengths)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"# {len(texts)} texts, {n_tokens} real tokens, lengths {min(lengths)}..{max(lengths)} "
        f"(median {int(np.median(lengths))}), {fpt / 1e6:.1f} MFLOP/token"
    )
    print(
        "| dtype | longembed tok/s | sentence-transformers tok/s | ratio | cosine min | "
        "longembed % of matmul peak |"
    )
    print("|---|---|---|---|---|---|")
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours = ours32 if dtype == torch.float32 else load_model(device="cpu", dtype="bf16")
        st = SentenceTransformer(str(ours32._m.folder), device="cpu").to(dtype)
        ours.embed(texts[:64])
        st.encode(texts[:64], batch_size=args.batch_size)
        t_ours = best_time(lambda m=ours: m.embed(texts), args.repeats)
        t_st = best_time(
            lambda s=st: s.encode(texts, batch_size=args.batch_size, normalize_embeddings=True), args.repeats
        )
        a = ours.embed(texts)
        b = st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)
        b = b.astype(np.float32)
        cosine = float(((a * b).sum(1) / np.linalg.norm(b, axis=1)).min())
        peak = matmul_peak_gflops(dtype)
        achieved = fpt * n_tokens / t_ours / 1e9
        print(
            f"| {dtype_name} | {n_tokens / t_ours:,.0f} | {n_tokens / t_st:,.0f} | {t_st / t_ours:.2f}x | "
            f"{cosine:.6f} | {100 * achieved / peak:.0f}% of {peak:.0f} GFLOP/s |"
        )


if __name__ == "__main__":
    main()
