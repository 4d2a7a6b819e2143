"""ONNX Runtime as the fp32 CPU backend of BERT and JinaBERT: exported at load time, cached, checked.

Why: a session run costs far less per call than torch's op dispatch, which is most of what a short
query pays for (1.6 vs ~8 ms for 12 tokens, bench/RESULTS.md). The PyTorch modules (bert.py,
jina_bert.py) stay the readable
reference: the graph is traced from them, through `PackedEncoder`, which reuses their weights and
sub-modules: packed tokens for the output projections and MLPs (no FLOP on padding), a padded
(batch, seq) layout for attention and its q, k, v projection, exported as ONNX Runtime's fused
Attention (com.microsoft) node.

- Export once per model revision and exporter/runtime versions; the file goes beside the model
  (`<folder>/longembed-onnx/`) or, when that folder is read-only, under the cache directory
  (`LONGEMBED_CACHE`, default `$XDG_CACHE_HOME/longembed`, `~/.cache/longembed`; as root
  `/var/cache/longembed`), in `onnx/`. A sidecar JSON holds the file's sha256: a corrupt file is
  detected and exported again.
- Every load runs a few sequences through both paths; the session is used only if every pooled vector
  agrees with the PyTorch forward (cosine >= `LONGEMBED_ONNX_MIN_COSINE`, default 0.99999), else the
  model stays on PyTorch with the reason logged and shown in `ModelInfo.backend_note`.
- `LONGEMBED_CPU_BACKEND`: `auto` (default: ONNX Runtime for fp32 BERT/JinaBERT on CPU when it
  imports and agrees, PyTorch otherwise), `onnx` (the same, but a failure is an error), `torch`.
- Only batches of at most `SMALL_BATCH_TOKENS` (queries, small requests) run on the session; larger
  ones, and so every long sequence, run on the packed PyTorch path (EmbeddingModel.forward_batch),
  which measured as fast or faster for bulk work here and never materialises (batch, heads, n, n)
  scores. Batches of at most QUERY_TOKENS may run on a second session with more threads
  (OnnxEncoder says when).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from longembed.encoder.batching import Sequence

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "torch")
ARCHITECTURES = ("bert", "jina_bert")
EXPORT_FORMAT = 4  # bump when PackedEncoder's graph changes: cached files of older formats are ignored
OPSET = 17
MAX_SEQ_TOKENS = 1024  # longest sequence the load-time check and the graph are meant for
# Batches up to this many tokens run on ONNX Runtime (a query: ~3x faster than torch's op dispatch),
# larger ones on the packed PyTorch path (as fast or faster for bulk work, bench/RESULTS.md).
SMALL_BATCH_TOKENS = 256
# Batches up to this many tokens (the batcher's inline queries) may run on a session with QUERY_THREADS.
QUERY_TOKENS = 64
QUERY_THREADS = 4  # at most; more threads barely help a dozen-row matmul
PROBE_EVERY = 16  # small batches: one in this many runs on the session that looked slower
DEFAULT_MIN_COSINE = 0.99999
# Sequences in one session run: the shortest at least this share of the longest. Only attention is
# padded, so a wide spread costs little (MiniLM: attention at 256 tokens is ~10 % of a token's FLOPs).
GROUP_RATIO = 0.5
INPUTS = ("input_ids", "position_ids", "pad_index", "attention_mask", "unpad_index")
DYNAMIC_AXES = {
    "input_ids": {0: "tokens"},
    "position_ids": {0: "tokens"},
    "pad_index": {0: "batch", 1: "seq"},
    "attention_mask": {0: "batch", 1: "seq"},
    "unpad_index": {0: "tokens"},
}
_MASKED = -1e9  # added to the scores of padding keys: exp() underflows to exactly 0


class OnnxUnavailable(RuntimeError):
    """The ONNX Runtime backend cannot serve this model; the message says why."""


def backend_choice() -> str:
    choice = (os.environ.get("LONGEMBED_CPU_BACKEND") or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"LONGEMBED_CPU_BACKEND must be one of {', '.join(BACKENDS)}, got {choice!r}")
    return choice


def min_cosine() -> float:
    value = os.environ.get("LONGEMBED_ONNX_MIN_COSINE") or str(DEFAULT_MIN_COSINE)
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"LONGEMBED_ONNX_MIN_COSINE must be a number, got {value!r}") from None


class PackedEncoder(nn.Module):
    """The model's forward for export: the same sub-modules and weights as the packed forward, with the
    tokens packed (no padding) for the embeddings, output projections and MLPs, and gathered into a
    padded (batch, seq) layout for attention and its q, k, v projection (ONNX has no varlen attention
    on CPU; groups of similar lengths keep the padding small); ALiBi (JinaBERT) is built inside the
    graph from the padded length.

    Inputs: input_ids, position_ids (T,); pad_index (B, n): the packed row of each padded slot (any
    row for padding); attention_mask (B, n) 0/1; unpad_index (T,): the padded slot of each row.
    Output: hidden (T, hidden)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.model = module
        slopes = getattr(module, "slopes", None)
        self.alibi = slopes is not None
        if self.alibi:
            self.register_buffer("neg_slopes", -slopes.float().view(1, -1, 1, 1), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        pad_index: torch.Tensor,
        attention_mask: torch.Tensor,
        unpad_index: torch.Tensor,
    ) -> torch.Tensor:
        m = self.model
        batch, n = pad_index.shape
        x = m.word_embeddings(input_ids) + m.token_type_embeddings.weight[0]
        if not self.alibi:
            x = x + m.position_embeddings(position_ids)
        x = m.embedding_norm(x)  # (T, hidden)
        mask = attention_mask.to(torch.int32)  # (B, n) 1 = a real key
        alibi = None
        if self.alibi:
            pos = torch.arange(n, device=x.device)
            alibi = self.neg_slopes * (pos[:, None] - pos[None, :]).abs().to(x.dtype)  # (1, heads, n, n)
        hidden = x.shape[-1]
        for layer in m.layers:
            att = layer.attention
            ctx = Attention.apply(x[pad_index], att.qkv.weight, att.qkv.bias, mask, alibi, att.heads)
            ctx = ctx.reshape(batch * n, hidden)
            x = att.norm(att.dense(ctx[unpad_index]) + x)
            x = layer.mlp(x)
        return x


class Attention(torch.autograd.Function):
    """softmax(q k^T / sqrt(head_dim) + bias) v with q, k, v = x W^T + b (the layer's fused `qkv`), on
    padded (B, n, hidden) x, with padding keys masked and an optional additive (1, heads, n, n) bias
    (ALiBi). Exported as one com.microsoft Attention node: ONNX Runtime's fused CPU kernel projects
    q, k and v straight into its per-head layout, in place of a Gemm, a Split and a MultiHeadAttention
    node that copies each of them into that layout (a 12-token query: bench/RESULTS.md). The forward
    below is what the trace runs; the load-time check compares the session against the PyTorch model
    itself."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, alibi, heads: int):
        batch, n, hidden = x.shape
        head_dim = hidden // heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, n, heads, head_dim).transpose(1, 2)  # (B, heads, n, head_dim)

        q, k, v = nn.functional.linear(x, weight, bias).split(hidden, dim=-1)
        scores_bias = (1.0 - mask.to(x.dtype))[:, None, None, :] * _MASKED
        if alibi is not None:
            scores_bias = scores_bias + alibi
        scores = torch.matmul(split(q), split(k).transpose(-1, -2)) * head_dim**-0.5 + scores_bias
        out = torch.matmul(torch.softmax(scores, dim=-1), split(v))
        return out.transpose(1, 2).reshape(batch, n, hidden)

    @staticmethod
    def symbolic(g, x, weight, bias, mask, alibi, heads: int):
        from torch.onnx.symbolic_helper import _optional_input_placeholder_tensor

        # inputs: input, weights (hidden, 3 hidden: q, k, v side by side; the Transpose of the
        # initializer is folded at load), bias (3 hidden), mask_index (B, n) int32 1 = a real key,
        # past (none), attention_bias
        inputs = [x, g.op("Transpose", weight, perm_i=[1, 0]), bias, mask]
        if alibi is not None:
            inputs += [_optional_input_placeholder_tensor(g), alibi]
        out = g.op("com.microsoft::Attention", *inputs, num_heads_i=heads)
        out.setType(x.type())  # (B, n, hidden) like the input; the exporter infers no contrib op's type
        return out


class OnnxEncoder:
    """ONNX Runtime sessions of one export: packed `Sequence`s in, pooled L2-normalised rows out.

    `query_session` (when there is one: more threads than `session`) may serve batches of at most
    QUERY_TOKENS: one short query is a handful of matmuls with a dozen rows each, bound by reading the
    weights, so on idle cores a second thread nearly halves it; on cores busy with other work the extra
    thread waits for a core and made queries 1.2-2.7x slower (bench/RESULTS.md). So it is used only
    when the caller says no other work of ours needs the cores (`spare_cores`: the host's batcher, for
    a query that found the model idle and nothing waiting lately), and then each small batch goes to
    whichever session has been faster per token lately. While that is `session` (the cores looked
    busy), one batch in PROBE_EVERY goes to the query session, so that it is used again once the cores
    are free. While it is the query session nothing probes the other: busy cores slow its second thread
    first, and its own cost rising above `session`'s last one moves small batches over (a probe of the
    one-thread session made every PROBE_EVERY-th lone query ~3 ms slower: a p99 of 5 ms)."""

    def __init__(self, session, path: Path, query_session=None) -> None:
        self.session = session
        self.query_session = query_session if query_session is not None else session
        self.path = path
        self._inputs = {i.name for i in session.get_inputs()}  # the exporter drops unused ones
        # Seconds per token of recent small batches: [query_session, session]; 0 = not measured yet.
        self.small_cost = [0.0, 0.0]
        self._small_runs = 0
        self._by_length: dict[int, dict[str, np.ndarray]] = {}  # _single_feed's index arrays

    def forward(self, sequences: list[Sequence], session=None, spare_cores: bool = False) -> np.ndarray:
        """Rows per pool span, in the order of the sequences and their spans (as forward_batch).
        `session`: run on this one (the load-time check). Otherwise `session`, unless the caller says
        the other cores are free (`spare_cores`) and the batch is small: then as the class says."""
        tokens = sum(len(s.ids) for s in sequences)
        small = spare_cores and tokens <= QUERY_TOKENS and self.query_session is not self.session
        if session is not None or not small:
            return self._run(session or self.session, sequences)
        self._small_runs += 1
        faster = int(self.small_cost[1] < self.small_cost[0])  # unmeasured (0) first
        probe = faster == 1 and self._small_runs % PROBE_EVERY == 0  # as the class says
        pick = 0 if probe else faster
        start = time.perf_counter()
        out = self._run((self.query_session, self.session)[pick], sequences)
        cost = (time.perf_counter() - start) / max(tokens, 1)
        old = self.small_cost[pick]
        # A probed session's cost dates from the load that made it slower: replaced, not averaged in.
        self.small_cost[pick] = cost if old == 0.0 or probe else 0.8 * old + 0.2 * cost
        return out

    def _run(self, session, sequences: list[Sequence]) -> np.ndarray:
        if len(sequences) == 1:  # a query: one run, nothing to group or place
            (hidden,) = session.run(None, self._single_feed(sequences[0].ids))
            return np.stack([_mean_normalise(hidden[a:b]) for a, b in sequences[0].pool_spans])
        starts = np.cumsum([0] + [len(s.pool_spans) for s in sequences])
        out: np.ndarray | None = None
        for group in attention_groups([len(s.ids) for s in sequences]):
            feed, offsets = self._feed([sequences[i] for i in group])
            (hidden,) = session.run(None, {k: v for k, v in feed.items() if k in self._inputs})
            if out is None:
                out = np.empty((int(starts[-1]), hidden.shape[-1]), dtype=np.float32)
            for i, offset in zip(group, offsets, strict=True):
                for j, (a, b) in enumerate(sequences[i].pool_spans):
                    out[starts[i] + j] = _mean_normalise(hidden[offset + a : offset + b])
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def _single_feed(self, ids: list[int]) -> dict[str, np.ndarray]:
        """One sequence's inputs: no padding, every index the identity. The index arrays depend only
        on the length and are kept per length up to QUERY_TOKENS: a query's time is mostly fixed costs,
        and each numpy call after a run (which streamed the weights through the caches) costs ~10 us."""
        fixed = self._by_length.get(len(ids))
        if fixed is None:
            slots = np.arange(len(ids), dtype=np.int64)
            arrays = {
                "position_ids": slots,
                "pad_index": slots[None, :],
                "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
                "unpad_index": slots,
            }
            fixed = {k: v for k, v in arrays.items() if k in self._inputs}
            for array in fixed.values():
                array.flags.writeable = False  # shared by every later query of this length
            if len(ids) <= QUERY_TOKENS:
                self._by_length[len(ids)] = fixed
        return {**fixed, "input_ids": np.array(ids, dtype=np.int64)}

    @staticmethod
    def _feed(sequences: list[Sequence]) -> tuple[dict[str, np.ndarray], list[int]]:
        lengths = [len(s.ids) for s in sequences]
        n = max(lengths)
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        slots = np.arange(n, dtype=np.int64)
        valid = slots[None, :] < np.asarray(lengths)[:, None]  # (B, n)
        pad_index = np.where(valid, offsets[:, None] + slots[None, :], 0)
        unpad_index = (np.arange(len(lengths), dtype=np.int64)[:, None] * n + slots[None, :])[valid]
        feed = {
            "input_ids": np.fromiter((t for s in sequences for t in s.ids), np.int64, sum(lengths)),
            "position_ids": np.concatenate([slots[:k] for k in lengths]),
            "pad_index": pad_index,
            "attention_mask": valid.astype(np.int64),
            "unpad_index": unpad_index,
        }
        return feed, offsets.tolist()


def attention_groups(lengths: list[int]) -> list[list[int]]:
    """Indices in groups that share one session run, longest first: a group's shortest is at least
    GROUP_RATIO of its longest (attention is padded to the longest; projections are not padded)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] >= GROUP_RATIO * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _mean_normalise(rows: np.ndarray) -> np.ndarray:
    """The rows' mean, L2-normalised: the sum normalised (the mean's 1/n cancels)."""
    total = rows.sum(axis=0, dtype=np.float64)
    return (total / max(math.sqrt(total @ total), 1e-12)).astype(np.float32)


# -- loading -------------------------------------------------------------------------------------


def load_onnx(
    module: nn.Module,
    architecture: str,
    config: object,
    name: str,
    folder: Path,
    revision: str,
    torch_forward: Callable[[list[Sequence]], np.ndarray],
    vocab_size: int,
    max_tokens: int,
) -> OnnxEncoder:
    """The model's ONNX Runtime encoder: from the cache when a valid file is there, else exported now;
    checked against `torch_forward` either way. Raises OnnxUnavailable with the reason."""
    if architecture not in ARCHITECTURES:
        raise OnnxUnavailable(f"architecture {architecture!r} has no ONNX export (only {ARCHITECTURES})")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise OnnxUnavailable(f"onnxruntime does not import ({exc})") from None
    key = cache_key(architecture, config, revision)
    path, fresh = _cached_or_exported(module, name, folder, key)
    checks = check_sequences(vocab_size, min(max_tokens, MAX_SEQ_TOKENS))
    encoder = _encoder(path)
    worst = _agreement(encoder, torch_forward, checks)
    if worst < min_cosine() and not fresh:  # a cached file that gives other vectors: export again
        log.warning(
            "cached ONNX export %s disagrees with PyTorch (cosine %.7f): exporting again",
            path,
            worst,
        )
        path = _export(module, path.parent, path.name)
        encoder = _encoder(path)
        worst = _agreement(encoder, torch_forward, checks)
    if worst < min_cosine():
        raise OnnxUnavailable(
            f"the ONNX export disagrees with the PyTorch forward (cosine {worst:.7f} < {min_cosine()})"
        )
    return encoder


def cache_key(architecture: str, config: object, revision: str) -> str:
    import onnx
    import onnxruntime

    parts = {
        "revision": revision,
        "architecture": architecture,
        "config": asdict(config),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "format": EXPORT_FORMAT,
        "opset": OPSET,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cache_dirs(folder: Path) -> list[Path]:
    """Where exports may live, in order: beside the model, then the user's cache directory."""
    return [folder / "longembed-onnx", user_cache() / "onnx"]


def user_cache() -> Path:
    """LONGEMBED_CACHE as plugin/settings.py reads it (the encoder does not import the plugin)."""
    if os.environ.get("LONGEMBED_CACHE"):
        return Path(os.environ["LONGEMBED_CACHE"]).expanduser().absolute()
    if os.geteuid() == 0:
        return Path("/var/cache/longembed")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "longembed"


def _file_name(name: str, folder: Path, key: str, shared: bool) -> str:
    """`model-<key>.onnx` beside the model (a copied or renamed folder keeps a valid export), and in the
    shared cache `<name>-<folder hash>-<key>.onnx`, so two folders of one name never clash. A new
    revision changes only the key: the export it replaces shares the rest of the name."""
    if not shared:
        return f"model-{key}.onnx"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-60:]
    return f"{stem}-{hashlib.sha256(os.fsencode(folder.resolve())).hexdigest()[:8]}-{key}.onnx"


def _cached_or_exported(module: nn.Module, name: str, folder: Path, key: str) -> tuple[Path, bool]:
    """(path of a valid export, whether it was exported just now)."""
    names = [_file_name(name, folder, key, shared) for shared in (False, True)]
    for directory, file_name in zip(cache_dirs(folder), names, strict=True):
        path = directory / file_name
        if path.exists():
            problem = _integrity_problem(path)
            if problem is None:
                return path, False
            log.warning("cached ONNX export %s is unusable (%s): exporting again", path, problem)
    errors = []
    for directory, file_name in zip(cache_dirs(folder), names, strict=True):
        try:
            path = _export(module, directory, file_name)
        except OSError as exc:  # read-only model folder: try the next place
            errors.append(f"{directory}: {exc}")
            continue
        except Exception as exc:  # the exporter's own failures (an unsupported op, a > 2 GB graph)
            raise OnnxUnavailable(f"the ONNX export failed: {type(exc).__name__}: {exc}") from None
        return path, True
    raise OnnxUnavailable("no writable place for the ONNX export: " + "; ".join(errors))


def _integrity_problem(path: Path) -> str | None:
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except (OSError, ValueError) as exc:
        return f"unreadable: {exc}"
    if meta.get("sha256") != digest:
        return "its sha256 does not match the one recorded at export"
    return None


def _export(module: nn.Module, directory: Path, file_name: str) -> Path:
    """Export into `directory` atomically (temporary file + rename), with its sidecar; stale exports
    of the same model there (another revision or version) are removed."""
    directory.mkdir(parents=True, exist_ok=True)
    prefix = file_name.rsplit("-", 1)[0]
    two = [Sequence([101, 2023, 2003, 102], [], []), Sequence([101, 7592, 102], [], [])]
    feed, _ = OnnxEncoder._feed(two)
    example = tuple(torch.from_numpy(feed[name]) for name in INPUTS)
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=directory)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
            torch.onnx.export(
                PackedEncoder(module).eval(),
                example,
                tmp,
                dynamo=False,
                opset_version=OPSET,
                input_names=list(INPUTS),
                output_names=["hidden"],
                dynamic_axes={**DYNAMIC_AXES, "hidden": {0: "tokens"}},
            )
        path = directory / file_name
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    sidecar = path.with_suffix(".json")
    sidecar.with_suffix(".json.tmp").write_text(json.dumps({"sha256": digest}))
    os.replace(sidecar.with_suffix(".json.tmp"), sidecar)
    for stale in directory.glob(f"{prefix}-*"):
        if stale.stem != path.stem:
            stale.unlink(missing_ok=True)
    log.info("exported %s for ONNX Runtime", path)
    return path


def _encoder(path: Path) -> OnnxEncoder:
    """A session with the encoder's (torch's) thread count, and one for queries with every core up to
    QUERY_THREADS when that is more (the host gives torch one core less than the machine has)."""
    model = path.read_bytes()
    threads = torch.get_num_threads()
    query_threads = min(QUERY_THREADS, usable_cores())
    query = _session(model, query_threads, spin_in_runs=True) if query_threads > threads else None
    return OnnxEncoder(_session(model, threads), path, query)


def usable_cores() -> int:
    """Cores this process may run on (its affinity where the OS has one, as in a container)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _session(model: bytes, threads: int, spin_in_runs: bool = False):
    """spin_in_runs: worker threads spin between the nodes of one run and stop when it returns
    (session.force_spinning_stop). For a query that is 1.9 ms instead of 2.7 ms with sleeping workers
    (2 threads, bench/RESULTS.md), and no CPU is burnt between queries, where ONNX Runtime's default
    spinning burnt ~35 ms of CPU in the 50 ms after each run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if spin_in_runs:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
    elif os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        # As torch's OpenMP threads in the host: idle threads sleep instead of spinning (shared cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for invalid models
        raise OnnxUnavailable(f"ONNX Runtime cannot load the export: {exc}") from None


def check_sequences(vocab_size: int, max_tokens: int) -> list[Sequence]:
    """A few deterministic sequences of mixed lengths (padding and several groups exercised)."""
    rng = np.random.default_rng(0)
    lengths = sorted({min(n, max_tokens) for n in (3, 9, 10, 37, 130)}, reverse=True)
    low = min(1000, vocab_size // 2)
    seqs = [rng.integers(low, vocab_size, size=n).tolist() for n in lengths]
    return [Sequence(ids, [(0, len(ids))], [i]) for i, ids in enumerate(seqs)]


def _agreement(
    encoder: OnnxEncoder, torch_forward: Callable[[list[Sequence]], np.ndarray], checks: list[Sequence]
) -> float:
    """The worst cosine of the pooled rows: the checks as one batch (the bulk session), and each short
    one alone on every session (the query session and the single-sequence feed)."""
    alone = [i for i, s in enumerate(checks) if len(s.ids) <= QUERY_TOKENS]
    sessions = list(dict.fromkeys([encoder.session, encoder.query_session]))
    try:
        ours = [encoder.forward(checks)]
        ours += [encoder.forward([checks[i]], session=s) for s in sessions for i in alone]
    except Exception as exc:  # onnxruntime's own error types
        raise OnnxUnavailable(f"ONNX Runtime cannot run the export: {exc}") from None
    reference = torch_forward(checks)
    expected = np.concatenate([reference] + [reference[alone]] * len(sessions))
    return float((np.concatenate(ours) * expected).sum(axis=1).min())
