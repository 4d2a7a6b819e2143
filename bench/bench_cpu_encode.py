"""CPU encoding side by side: longembed (PyTorch and ONNX Runtime backends, fp32 and bf16), a plain ONNX
Runtime export as a peer, and sentence-transformers; mixed-length texts, 8,192-token JinaBERT-shaped
inputs, single short queries through the host's batcher, concurrent clients, and what one short
query's time is made of (`floor`: the weights' read time, the matrix products alone, the runtimes'
run alone, the leanest Python path around it).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_cpu_encode.py [--texts 400] [--repeats 3]
        [--jina-tokens 8192] [--queries 310] [--only mixed|jina|queries|concurrent|floor]

One process, one run; the systems take turns in every round (best of --repeats), so a change in the
load of this shared machine hits all of them alike. tokens/s counts real tokens ([CLS], [SEP]
included, padding not credited). The peak is the best fp32 matmul GFLOP/s measured here at the start
(torch and ONNX Runtime's MatMul, 2048^3); bf16's peak is torch's bf16 matmul. The ONNX Runtime peer
is what a user would build: Hugging Face's BertModel exported with torch.onnx.export, graph
optimisations on, the same thread count, length-sorted batches of 32 padded to their longest text,
mean pooling over the mask; its fused variant also runs ONNX Runtime's BERT optimizer
(onnxruntime.transformers.optimizer: fused Attention, SkipLayerNormalization, BiasGelu), as
ONNX Runtime's own BERT recipe does.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.bench_encoder_cpu import flops_per_token, mixed_length_texts  # noqa: E402
from longembed.encoder import load_model  # noqa: E402
from longembed.plugin.cli import serve  # noqa: E402

warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes

QUERY = "how do I reset my password on the router"  # 10 tokens, 12 with [CLS] and [SEP] (MiniLM)


def load(backend: str, dtype: str = "fp32", source=None):
    os.environ["LONGEMBED_CPU_BACKEND"] = backend
    try:
        return load_model(source, device="cpu", dtype=dtype)
    finally:
        del os.environ["LONGEMBED_CPU_BACKEND"]


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def matmul_peaks(threads: int, n: int = 2048) -> dict[str, float]:
    """GFLOP/s of one n^3 matmul, best of 5: torch fp32, torch bf16, ONNX Runtime fp32."""
    import onnx
    from onnx import TensorProto, helper

    def best(fn) -> float:
        fn()
        return min(_timed(fn) for _ in range(5))

    peaks = {}
    for name, dtype in (("torch fp32", torch.float32), ("torch bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        peaks[name] = 2 * n**3 / best(lambda a=a, b=b: a @ b) / 1e9
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/matmul.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        session = ort_session(path, threads)
        feed = {x: np.random.randn(n, n).astype(np.float32) for x in "ab"}
        peaks["onnxruntime fp32"] = 2 * n**3 / best(lambda: session.run(None, feed)) / 1e9
    return peaks


class OrtPeer:
    """Hugging Face BertModel -> torch.onnx.export -> ONNX Runtime; padded length-sorted batches.

    fused: the model in its eager attention (the form ONNX Runtime's BERT fusions recognise) and the
    export run through onnxruntime.transformers.optimizer (EmbedLayerNormalization, Attention,
    SkipLayerNormalization, BiasGelu), as ONNX Runtime's own BERT recipe does."""

    def __init__(self, folder: Path, threads: int, tmp: str, fused: bool = False) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        extra = {"attn_implementation": "eager"} if fused else {}
        model = AutoModel.from_pretrained(str(folder), **extra).eval()

        class Hidden(torch.nn.Module):
            def __init__(self, m) -> None:
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask):
                return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        ids = torch.tensor([[101, 2023, 2003, 102], [101, 7592, 102, 0]])
        path = f"{tmp}/peer{'-fused' if fused else ''}.onnx"
        axes = {0: "batch", 1: "seq"}
        torch.onnx.export(
            Hidden(model),
            (ids, (ids != 0).long()),
            path,
            dynamo=False,
            opset_version=17,
            input_names=["input_ids", "attention_mask"],
            output_names=["hidden"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "hidden": axes},
        )
        if fused:
            from onnxruntime.transformers.optimizer import optimize_model

            config = AutoConfig.from_pretrained(str(folder))
            optimized = optimize_model(
                path, model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
            )
            fusions = optimized.get_fused_operator_statistics()
            assert fusions["Attention"] == config.num_hidden_layers, fusions  # else not the fused peer
            optimized.save_model_to_file(path)
        self.session = ort_session(path, threads)

    def query(self, text: str) -> np.ndarray:
        """One text: tokenise, run, mean-pool, normalise (what a user's query path does)."""
        enc = self.tokenizer([text], return_tensors="np")
        feed = {
            "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
        }
        (hidden,) = self.session.run(None, feed)
        mean = hidden[0].mean(0)
        return mean / np.linalg.norm(mean)

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        out = np.empty((len(texts), 384), dtype=np.float32)
        for k in range(0, len(order), batch_size):
            idx = order[k : k + batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=256, return_tensors="np"
            )
            mask = enc["attention_mask"].astype(np.int64)
            feed = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": mask}
            (hidden,) = self.session.run(None, feed)
            mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
            out[idx] = mean / np.linalg.norm(mean, axis=1, keepdims=True)
        return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(systems: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """(best seconds, warm-up output) per system; each round runs every system once."""
    outputs = {name: fn() for name, fn in systems.items()}  # warm-up
    best = dict.fromkeys(systems, float("inf"))
    for _ in range(repeats):
        for name, fn in systems.items():
            best[name] = min(best[name], _timed(fn))
    return best, outputs


def load_average() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def mixed(args, threads: int, peaks: dict, tmp: str) -> None:
    from sentence_transformers import SentenceTransformer

    texts = mixed_length_texts(args.texts)
    default = load("auto")
    folder = default._m.folder
    models = {"torch fp32": load("torch"), "default fp32": default, "bf16": load("auto", "bf16")}
    peer = OrtPeer(folder, threads, tmp)
    fused_peer = OrtPeer(folder, threads, tmp, fused=True)
    st = SentenceTransformer(str(folder), device="cpu")
    lengths = [min(n, default.info.max_tokens - 2) + 2 for n in default.count_tokens(texts)]
    n_tokens, fpt = sum(lengths), flops_per_token(default._m.config, lengths)
    print(
        f"\n## {len(texts)} mixed-length texts, all-MiniLM-L6-v2: {n_tokens} real tokens, "
        f"{min(lengths)}..{max(lengths)} per text (median {int(np.median(lengths))}), "
        f"{fpt / 1e6:.1f} MFLOP/token; {load_average()} before"
    )
    systems = {f"longembed {k} ({m.info.backend})": (lambda m=m: m.embed(texts)) for k, m in models.items()}
    systems["ONNX Runtime peer (HF export, padded batches of 32)"] = lambda: peer.embed(texts)
    systems["ONNX Runtime peer, fused (HF eager export + ORT BERT optimizer, batches of 32)"] = lambda: (
        fused_peer.embed(texts)
    )
    systems["sentence-transformers fp32 (batch 32)"] = lambda: st.encode(
        texts, batch_size=32, normalize_embeddings=True
    )
    seconds, vectors = interleaved(systems, args.repeats)
    reference = vectors["sentence-transformers fp32 (batch 32)"]
    st_rate = n_tokens / seconds["sentence-transformers fp32 (batch 32)"]
    fp32_peak = max(peaks["torch fp32"], peaks["onnxruntime fp32"])
    print(f"({load_average()} after)\n")
    print("| system | tokens/s | vs sentence-transformers | share of matmul peak | cosine min vs s.-t. |")
    print("|---|---|---|---|---|")
    for name, s in seconds.items():
        peak = peaks["torch bf16"] if "bf16" in name else fp32_peak
        cosine = float((np.asarray(vectors[name], dtype=np.float32) * reference).sum(1).min())
        rate = n_tokens / s
        print(
            f"| {name} | {rate:,.0f} | {rate / st_rate:.2f}x | {100 * fpt * rate / 1e9 / peak:.0f} % of "
            f"{peak:.0f} GFLOP/s | {cosine:.6f} |"
        )


def jina(args, peaks: dict, tmp: str) -> None:
    """Random weights in the published jina-embeddings-v2-small layout, one document of n tokens."""
    from longembed.encoder import onnx_cpu
    from tests.jina_reference import jina_config, write_checkpoint

    config = jina_config(8, 512, layers=4, intermediate=2048)
    folder = Path(tmp) / "jina-small-random"
    write_checkpoint(folder, config)
    default, fp32, bf16 = (
        load("auto", source=folder),
        load("torch", source=folder),
        load("auto", "bf16", folder),
    )
    rng = np.random.default_rng(0)
    words = [w for w in default._m.tokenizer.get_vocab() if w.isalpha() and len(w) > 3]
    text = " ".join(rng.choice(words, size=args.jina_tokens))
    ids = default.prepare([text], "full").sequences
    n = len(ids[0].ids)
    print(
        f"\n## JinaBERT-shaped (small: 4 layers, 512 hidden, 8 heads; random weights), one {n}-token document"
    )
    print(
        f"({load_average()} before; sequences past {onnx_cpu.MAX_SEQ_TOKENS} tokens take the PyTorch path)\n"
    )
    systems = {
        f"longembed default fp32 ({default.info.backend}, PyTorch past {onnx_cpu.MAX_SEQ_TOKENS})": default,
        "longembed torch fp32": fp32,
        "longembed bf16": bf16,
    }
    runs = {name: (lambda m=m: m.embed([text])) for name, m in systems.items()}
    if default._onnx is not None and n <= 4096:  # the graph itself: (heads, n, n) scores, so not at 8192
        runs["ONNX Runtime, our export on the whole document"] = lambda: default._onnx.forward(ids)
    seconds, vectors = interleaved(runs, max(1, args.repeats - 1))
    reference = vectors["longembed torch fp32"]
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    fpt = layers * (2 * (4 * h * h + 3 * h * inter) + 4 * h * n)  # GEGLU MLP: 3 h x I matmuls
    print(f"({load_average()} after)\n")
    print("| system | tokens/s | share of matmul peak | cosine vs longembed torch fp32 |")
    print("|---|---|---|---|")
    for name, s in seconds.items():
        vector = vectors[name]
        peak = peaks["torch bf16"] if "bf16" in name else max(peaks["torch fp32"], peaks["onnxruntime fp32"])
        rate = n / s
        print(
            f"| {name} | {rate:,.0f} | {100 * fpt * rate / 1e9 / peak:.0f} % of {peak:.0f} GFLOP/s | "
            f"{float((vector * reference).sum()):.6f} |"
        )


def queries(args, tmp: str) -> None:
    """One short query at a time through what the host runs: ServedModel.plan -> Batcher -> finish;
    the ONNX Runtime peers' own query path (tokenise, run, pool) beside it."""
    from longembed.plugin.service.batcher import INTERACTIVE, Batcher
    from longembed.plugin.service.served import ServedModel

    print(f"\n## One {QUERY!r} query at a time through the host's batcher ({load_average()} before)\n")
    print(
        "| backend | torch threads | ORT query threads | batcher path | p50 ms | p99 ms | model alone p50 ms"
        " |"
    )
    print("|---|---|---|---|---|---|---|")
    cores = os.cpu_count() or 2
    variants = [("torch", None), ("auto", "PASSIVE"), ("auto", None)]  # ORT spinning off (as the host) / on
    for threads in sorted({max(1, cores - 1), cores}):
        torch.set_num_threads(threads)
        for backend, wait_policy in variants:
            if wait_policy:  # read by onnx_cpu when it makes the session; torch read it at import
                os.environ["OMP_WAIT_POLICY"] = wait_policy
            model = load(backend)
            os.environ.pop("OMP_WAIT_POLICY", None)
            spin = (
                ""
                if backend == "torch"
                else (", OMP_WAIT_POLICY=PASSIVE as the host" if wait_policy else ", default spinning")
            )
            ort_threads = "-"
            if model._onnx is not None:
                ort_threads = str(model._onnx.query_session.get_session_options().intra_op_num_threads)
            assert len(model.prepare([QUERY], "full", kind="query").sequences[0].ids) == 12
            for inline in (64, 0):
                batcher = Batcher(
                    model.forward_batch,
                    model.info.dim,
                    inline_tokens=inline,
                    forward_alone=functools.partial(model.forward_batch, spare_cores=True),  # as the host
                )
                served = ServedModel(model, batcher)

                def one(served=served) -> None:
                    plan = served.plan([QUERY], "query", None, "truncate")
                    served.finish(plan, served.submit(plan, INTERACTIVE).result(), "truncate", None)

                latencies = [_timed(one) for _ in range(args.queries)][10:]
                batcher.stop()
                alone = [_timed(lambda m=model: m.embed([QUERY], kind="query")) for _ in range(args.queries)][
                    10:
                ]
                p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
                path = "caller's thread (inline)" if inline else "batcher thread"
                print(
                    f"| {model.info.backend}{spin} | {threads} | {ort_threads} | {path} | {p50:.2f} | "
                    f"{p99:.2f} | {np.median(alone) * 1000:.2f} |"
                )
        folder = model._m.folder
        for name, fused in (("ONNX Runtime peer", False), ("ONNX Runtime peer, fused", True)):
            peer = OrtPeer(folder, threads, tmp, fused=fused)
            alone = [_timed(lambda p=peer: p.query(QUERY)) for _ in range(args.queries)][10:]
            p50, p99 = np.percentile(np.array(alone) * 1000, [50, 99])
            print(f"| {name} (spinning) | - | {threads} | its own (no batcher) | {p50:.2f} | {p99:.2f} | - |")
    print(f"\n({load_average()} after)")


def floor(args, tmp: str) -> None:
    """One short query from the bottom up, on the host's query session (every core, spinning inside a
    run): reading the encoder's weights once at the measured memory bandwidth (the bound for a
    dozen rows: every weight is read once and used 12 times); ONNX Runtime running only our export's
    matrix products (its Gemm nodes and the q, k, v projections inside its Attention nodes, as Gemm
    nodes: same weights, same shapes); our whole export; the fused ONNX Runtime peer's graph;
    the leanest Python around our run (the tokenizer's own encode, one run, numpy pooling); the host's
    path (plan, batcher inline, finish). Best of three blocks of --queries runs each (see below)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer

    from longembed.encoder import onnx_cpu
    from longembed.plugin.service.batcher import INTERACTIVE, Batcher
    from longembed.plugin.service.served import ServedModel

    cores = onnx_cpu.usable_cores()
    torch.set_num_threads(max(1, cores - 1))  # the host's setting: its query session gets every core
    model = load("auto")
    encoder = model._onnx
    session = encoder.query_session
    threads = session.get_session_options().intra_op_num_threads
    ids = model.prepare([QUERY], "full", kind="query").sequences[0].ids
    slots = np.arange(len(ids), dtype=np.int64)
    feed = {
        "input_ids": np.asarray(ids, dtype=np.int64),
        "position_ids": slots,
        "pad_index": slots[None, :],
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
        "unpad_index": slots,
    }
    feed = {k: v for k, v in feed.items() if k in {i.name for i in session.get_inputs()}}

    exported = onnx.load(str(encoder.path))
    weights = {i.name: numpy_helper.to_array(i) for i in exported.graph.initializer}
    gemms = [n for n in exported.graph.node if n.op_type in ("Gemm", "Attention")]
    nodes, inits, inputs = [], [], {}
    for i, node in enumerate(gemms):
        w, b = weights[node.input[1]], weights[node.input[2]]
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        k = w.shape[1] if transposed else w.shape[0]
        inputs[k] = helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [len(ids), k])
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [f"x{k}", f"w{i}", f"b{i}"], [f"y{i}"], transB=int(transposed)))
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(gemms))]
    graph = helper.make_graph(nodes, "gemms", list(inputs.values()), outputs, inits)
    gemm_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_cpu.OPSET)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    gemm_session = ort.InferenceSession(
        gemm_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    gemm_feed = {f"x{k}": np.random.default_rng(0).standard_normal((len(ids), k), np.float32) for k in inputs}
    weight_bytes = sum(weights[n.input[1]].nbytes + weights[n.input[2]].nbytes for n in gemms)

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    buffer = torch.ones(weight_bytes // 4)
    read_s = min(_timed(buffer.sum) for _ in range(50))
    torch.set_num_threads(torch_threads)

    tokenizer = Tokenizer.from_file(str(model._m.folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    assert tokenizer.encode(QUERY).ids == list(ids), "the tokenizer file disagrees with the model's tokens"

    def lean() -> np.ndarray:
        token_ids = np.asarray(tokenizer.encode(QUERY).ids, dtype=np.int64)
        positions = np.arange(len(token_ids), dtype=np.int64)
        one = {
            "input_ids": token_ids,
            "position_ids": positions,
            "pad_index": positions[None, :],
            "attention_mask": np.ones((1, len(token_ids)), dtype=np.int64),
            "unpad_index": positions,
        }
        (hidden,) = session.run(None, {k: v for k, v in one.items() if k in feed})
        mean = hidden.mean(axis=0)
        return mean / np.linalg.norm(mean)

    batcher = Batcher(
        model.forward_batch,
        model.info.dim,
        forward_alone=functools.partial(model.forward_batch, spare_cores=True),  # as the host
    )
    served = ServedModel(model, batcher)

    def host() -> None:
        plan = served.plan([QUERY], "query", None, "truncate")
        served.finish(plan, served.submit(plan, INTERACTIVE).result(), "truncate", None)

    peer = OrtPeer(model._m.folder, threads, tmp, fused=True)
    peer_feed = {"input_ids": feed["input_ids"][None, :], "attention_mask": np.ones((1, len(ids)), np.int64)}
    systems = {
        f"ONNX Runtime, our export's {len(gemms)} matrix products alone (as Gemm nodes)": lambda: (
            gemm_session.run(None, gemm_feed)
        ),
        "ONNX Runtime, our whole export (run alone)": lambda: session.run(None, feed),
        "ONNX Runtime, the fused peer's graph (run alone)": lambda: peer.session.run(None, peer_feed),
        "leanest Python path: tokenizers' encode + our run + numpy pooling": lean,
        "host path: ServedModel.plan -> Batcher (inline) -> finish": host,
    }
    print(
        f"\n## What one {QUERY!r} query ({len(ids)} tokens) costs, {threads} ONNX Runtime threads "
        f"({load_average()} before)\n"
    )
    # In blocks, not interleaved: each system runs --queries times in a row (its weights stay in the
    # caches, as for a stream of queries); three rounds of blocks, the best block's p50 kept.
    p50s = dict.fromkeys(systems, float("inf"))
    for _ in range(3):
        for name, fn in systems.items():
            for _ in range(20):
                fn()
            p50s[name] = min(p50s[name], float(np.median([_timed(fn) for _ in range(args.queries)])))
    batcher.stop()
    host_p50 = p50s["host path: ServedModel.plan -> Batcher (inline) -> finish"]
    print("| step | p50 ms | share of the host path |")
    print("|---|---|---|")
    print(
        f"| reading the {weight_bytes / 2**20:.1f} MiB of projection weights once ({threads} threads, "
        f"{weight_bytes / read_s / 1e9:.0f} GB/s) | {read_s * 1000:.3f} | {read_s / host_p50:.0%} |"
    )
    for name, p50 in p50s.items():
        print(f"| {name} | {p50 * 1000:.3f} | {p50 / host_p50:.0%} |")
    rollup = Path("/proc/self/smaps_rollup")
    if rollup.exists():  # Linux: how much of this process sits in transparent huge pages
        huge = next(
            (line.split()[1] for line in rollup.read_text().splitlines() if line.startswith("AnonHuge")), "0"
        )
        print(f"\nAnonHugePages of this process: {int(huge) / 1024:.0f} MiB")
    print(f"\n({load_average()} after)")


def concurrent(args) -> None:
    """Clients in threads, each sending one input at a time through the host's batcher, as the host
    runs (torch on one core less than the machine, OMP_WAIT_POLICY=PASSIVE): half the inputs the
    10-token query, half mixed texts cut to 300 characters. The default (small inputs may take the
    query session) against ONNX Runtime with one session (onnx_cpu.QUERY_THREADS = 1)."""
    import threading

    from longembed.encoder import onnx_cpu
    from longembed.plugin.service.batcher import INTERACTIVE, Batcher
    from longembed.plugin.service.served import ServedModel

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    models = {}
    default_threads = onnx_cpu.QUERY_THREADS
    for name, query_threads in (("one session", 1), ("default", default_threads)):
        onnx_cpu.QUERY_THREADS = query_threads
        models[name] = load("auto")
    onnx_cpu.QUERY_THREADS = default_threads
    os.environ.pop("OMP_WAIT_POLICY")
    texts = [t[:300] for t in mixed_length_texts(64)]

    def clients(model, n_clients: int, each: int) -> tuple[float, float, float]:
        batcher = Batcher(
            model.forward_batch,
            model.info.dim,
            forward_alone=functools.partial(model.forward_batch, spare_cores=True),  # as the host
        )
        served = ServedModel(model, batcher)
        latencies: list[float] = []

        def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for k in range(each):
                text = texts[rng.integers(len(texts))] if k % 2 else QUERY
                start = time.perf_counter()
                plan = served.plan([text], "query", None, "truncate")
                served.finish(plan, served.submit(plan, INTERACTIVE).result(), "truncate", None)
                latencies.append(time.perf_counter() - start)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
        wall = _timed(lambda: ([t.start() for t in threads], [t.join() for t in threads]))
        batcher.stop()
        p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
        return n_clients * each / wall, p50, p99

    print(f"\n## Concurrent clients through the host's batcher, host settings ({load_average()} before)\n")
    print("| ONNX Runtime sessions | clients | inputs/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for n_clients in (1, 4):
        for _ in range(max(1, args.repeats - 1)):  # alternate, so both see the same load
            for name, model in models.items():
                rate, p50, p99 = clients(model, n_clients, args.queries // (2 * n_clients) + 10)
                print(f"| {name} | {n_clients} | {rate:,.0f} | {p50:.2f} | {p99:.2f} |")
    print(f"\n({load_average()} after)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jina-tokens", type=int, default=8192)
    parser.add_argument("--queries", type=int, default=310)
    parser.add_argument(
        "--only", choices=["mixed", "jina", "queries", "concurrent", "floor"], action="append"
    )
    args = parser.parse_args()
    serve.prefer_huge_pages()  # as the host runs (GLIBC_TUNABLES=glibc.malloc.hugetlb=0 to compare)
    import onnxruntime
    import sentence_transformers
    import transformers

    threads = torch.get_num_threads()
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), "
        f"onnxruntime {onnxruntime.__version__}, sentence-transformers {sentence_transformers.__version__}, "
        f"transformers {transformers.__version__}; {load_average()}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
    )
    peaks = matmul_peaks(threads)
    print("# matmul peaks (2048^3, GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("LONGEMBED_CACHE", tmp)
        if not args.only or "mixed" in args.only:
            mixed(args, threads, peaks, tmp)
        if not args.only or "jina" in args.only:
            jina(args, peaks, tmp)
        if not args.only or "queries" in args.only:
            queries(args, tmp)
        if not args.only or "concurrent" in args.only:
            concurrent(args)
        if not args.only or "floor" in args.only:
            floor(args, tmp)


if __name__ == "__main__":
    main()
