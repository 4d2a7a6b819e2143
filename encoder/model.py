"""`EmbeddingModel`: texts in, L2-normalised float32 vectors out, in input order.

Pipeline: prefix + tokenise -> sequences (whole texts, token windows, or pooling spans of one pass)
-> length-sorted packed batches under a token budget -> model -> fused mean-pool + L2 norm per span.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from longembed import triton_kernels
from longembed.encoder import onnx_cpu
from longembed.encoder.batching import Sequence, pack, plan_batches
from longembed.encoder.chunking import char_span, check_mode, default_chunk_tokens, windows
from longembed.encoder.loading import LoadedModel, load
from longembed.encoder.profiles import KINDS, check_dimensions, profile_for, truncate_dim

log = logging.getLogger(__name__)

# Full mode tokenises a long text's head only: this many characters per token to keep is far more than
# any BERT-family vocabulary needs (English averages 4-5), and a too-short head falls back to all of it.
HEAD_CHARS_PER_TOKEN = 16
# Token budget per packed batch: CPU matmuls run best on cache-sized batches, GPUs want big ones.
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    dim: int
    max_tokens: int  # per sequence, including [CLS] and [SEP]
    pooling: str
    prefixes: dict[str, str]
    revision: str
    device: str
    dtype: str
    source: str  # loads this model again from anywhere: hub id or absolute folder (loading.py)
    matryoshka_dims: tuple[int, ...] = ()  # sizes it may be truncated to (see profiles.Profile)
    backend: str = "torch"  # what runs the forward passes: "torch" (Triton kernels on CUDA) or "onnxruntime"
    backend_note: str = ""  # why a CPU model is not on ONNX Runtime (onnx_cpu.py), when it is not

    def sized(self, vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
        """`vectors` cut to `dimensions` by the Matryoshka recipe (profiles.truncate_dim); None or the
        model's own size leave them as they are."""
        if dimensions is None or dimensions == self.dim:
            return vectors
        return truncate_dim(vectors, dimensions, self.matryoshka_dims)


@dataclass(frozen=True)
class Chunk:
    ordinal: int
    start: int  # character span [start, end) in the original text (prefix excluded)
    end: int
    n_tokens: int  # content tokens of this chunk, without special tokens and prefix
    vector: np.ndarray = field(repr=False)
    truncated: bool = False  # "full" mode: the text did not fit in max_tokens


@dataclass(frozen=True)
class DocumentVectors:
    """A document's chunks and its head vector (`EmbeddingModel.embed_documents`)."""

    chunks: list[Chunk]
    head: np.ndarray = field(repr=False)  # what `full` mode gives: the model's first window of the text
    head_tokens: int  # content tokens in that window
    head_truncated: bool  # the text did not fit in it


@dataclass(frozen=True)
class Plan:
    """Texts laid out as model sequences (`EmbeddingModel.prepare`): run the sequences anywhere, then
    `assemble` their vectors into chunks."""

    sequences: list[Sequence]  # `outputs` index rows of the (n_out, dim) result
    layout: list[list[tuple[int, int, int, bool]]]  # per text, per chunk: (start, end, n_tokens, truncated)
    n_out: int
    n_tokens: list[int]  # per text: tokens fed to the model, [CLS], [SEP] and prefix included
    # With `prepare(head=True)`, per text: the output row of its head vector (what `full` mode gives:
    # the first window of the model, the whole text for an 8192-token model) and whether it was cut.
    heads: list[tuple[int, int, bool]] = field(default_factory=list)  # (row, content tokens, truncated)

    def assemble(self, vectors: np.ndarray) -> list[list[Chunk]]:
        """Per text, its chunks in order, from the (n_out, dim) vectors of `sequences`."""
        result, k = [], 0
        for spans in self.layout:
            doc = []
            for ordinal, (start, end, n_tokens, truncated) in enumerate(spans):
                doc.append(Chunk(ordinal, start, end, n_tokens, vectors[k], truncated))
                k += 1
            result.append(doc)
        return result

    def head_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """(n_texts, dim): each text's head vector, from the (n_out, dim) vectors of `sequences`."""
        return vectors[[row for row, _, _ in self.heads]]

    def documents(self, vectors: np.ndarray) -> list[DocumentVectors]:
        """Per text its chunks and head vector (a plan made with `head=True`)."""
        heads = self.head_vectors(vectors)
        return [
            DocumentVectors(chunks, heads[i], *self.heads[i][1:])
            for i, chunks in enumerate(self.assemble(vectors))
        ]


class EmbeddingModel:
    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype) -> None:
        self._m = loaded
        self.device = device
        self.dtype = dtype
        self.module = loaded.module.to(device=device, dtype=dtype)
        profile = profile_for(loaded.name, loaded.folder)
        self._onnx, note = self._select_cpu_backend()
        self.info = ModelInfo(
            name=loaded.name,
            architecture=loaded.architecture,
            dim=loaded.config.hidden_size,
            max_tokens=loaded.max_tokens,
            pooling=profile.pooling,
            prefixes=profile.prefixes,
            revision=loaded.revision,
            device=str(device),
            dtype=DTYPE_NAMES[dtype],
            source=loaded.source,
            matryoshka_dims=profile.matryoshka_dims,
            backend="onnxruntime" if self._onnx is not None else "torch",
            backend_note=note,
        )
        self._prefix_ids: dict[str, list[int]] = {}

    # -- public API --------------------------------------------------------------------------

    def embed(
        self,
        texts: Seq[str],
        kind: str = "document",
        instruction: str | None = None,
        batch_tokens: int | None = None,
        progress: bool = False,
        dimensions: int | None = None,
    ) -> np.ndarray:
        """One vector per text (truncated at max_tokens); float32 (n, dim), rows L2-normalised.
        `dimensions`: a Matryoshka size of the model (see `embed_chunks`); the rows are then that long."""
        chunks = self.embed_chunks(
            texts,
            mode="full",
            kind=kind,
            instruction=instruction,
            batch_tokens=batch_tokens,
            progress=progress,
            dimensions=dimensions,
        )
        if not chunks:
            return np.zeros((0, dimensions or self.info.dim), dtype=np.float32)
        return np.stack([doc[0].vector for doc in chunks])

    def embed_chunks(
        self,
        texts: Seq[str],
        mode: str = "chunk",
        chunk_tokens: int | None = None,
        overlap: int = 32,
        kind: str = "document",
        instruction: str | None = None,
        batch_tokens: int | None = None,
        progress: bool = False,
        dimensions: int | None = None,
    ) -> list[list[Chunk]]:
        """Per text, its chunks in order: `full` one (maybe truncated), `chunk` token windows each
        embedded alone, `late` token windows pooled from one pass over the whole text.

        chunk_tokens defaults to encoder.chunking.default_chunk_tokens: what fits in the model's
        window next to the prefix, at most DEFAULT_CHUNK_TOKENS.
        `dimensions`: None or the model's own size give its vectors; one of `info.matryoshka_dims` gives
        each vector cut to that size by the Matryoshka recipe (profiles.truncate_dim); any other size is
        refused (ValueError) before any work.
        The same as `prepare` (tokenise) + `run_sequences` (model) + `Plan.assemble`; the model host
        runs the middle step in its batcher, for sequences of many callers at once."""
        check_dimensions(dimensions, self.info.dim, self.info.matryoshka_dims, self.info.name)
        plan = self.prepare(texts, mode, chunk_tokens, overlap, kind, instruction)
        rows = self.run_sequences(plan.sequences, plan.n_out, batch_tokens, progress)
        rows = self.info.sized(rows, dimensions)
        return plan.assemble(rows)

    def embed_documents(
        self,
        texts: Seq[str],
        mode: str = "chunk",
        chunk_tokens: int | None = None,
        overlap: int = 32,
        kind: str = "document",
        instruction: str | None = None,
        batch_tokens: int | None = None,
        progress: bool = False,
        dimensions: int | None = None,
    ) -> list[DocumentVectors]:
        """`embed_chunks` plus each text's head vector (== `embed` of the text), in one batched run:
        a chunk that is the head is not embedded twice (see `prepare(head=True)`)."""
        check_dimensions(dimensions, self.info.dim, self.info.matryoshka_dims, self.info.name)
        plan = self.prepare(texts, mode, chunk_tokens, overlap, kind, instruction, head=True)
        rows = self.run_sequences(plan.sequences, plan.n_out, batch_tokens, progress)
        rows = self.info.sized(rows, dimensions)
        return plan.documents(rows)

    def prepare(
        self,
        texts: Seq[str],
        mode: str = "chunk",
        chunk_tokens: int | None = None,
        overlap: int = 32,
        kind: str = "document",
        instruction: str | None = None,
        head: bool = False,
    ) -> Plan:
        """Tokenise and lay out `texts` as model sequences (no model call; safe from any thread).

        `head`: also lay out each text's head vector (`Plan.heads`), the vector `full` mode gives. It
        costs nothing where a chunk already is that sequence (full mode; chunk mode when the first
        window is the whole head) or one more pooled span of the first pass (late mode); otherwise one
        more sequence of the head's tokens, batched with the chunks."""
        texts = _check_texts(texts)
        check_mode(mode, self.info.pooling, self.info.name)
        prefix = self._prefix(kind, instruction)
        room = self.info.max_tokens - 2 - len(prefix)  # content tokens per sequence
        if room <= 0:
            raise ValueError(f"the prefix takes {len(prefix)} tokens: nothing fits in {self.info.max_tokens}")
        if chunk_tokens is None:
            chunk_tokens = default_chunk_tokens(room)
        if mode != "full" and chunk_tokens > room:
            raise ValueError(
                f"chunk_tokens {chunk_tokens} does not fit {self.info.name}: at most {room} content tokens "
                f"({self.info.max_tokens} minus [CLS], [SEP] and {len(prefix)} prefix tokens)"
            )
        encodings = self._tokenize(texts, room if mode == "full" else None)

        sequences: list[Sequence] = []
        layout: list[list[tuple[int, int, int, bool]]] = []  # per text: (start, end, n_tokens, truncated)
        fed: list[int] = []  # per text: tokens of its sequences, [CLS], [SEP] and prefix included
        n_out = 0
        # Head vectors get the output rows after every chunk's (Plan.assemble reads chunks in order):
        # (text index, the late pass to pool once more / the head's own sequence), rows filled in below.
        heads: list[tuple[int, int, bool]] = []
        late_heads: list[tuple[int, Sequence]] = []
        own_heads: list[tuple[int, Sequence]] = []
        for text, enc in zip(texts, encodings, strict=True):
            ids, offsets = enc.ids, enc.offsets
            spans: list[tuple[int, int, int, bool]] = []
            first = len(sequences)
            first_out = n_out
            if mode == "full":
                kept = min(len(ids), room)
                start, end = (0, len(text)) if kept == len(ids) else (0, offsets[kept - 1][1])
                sequences.append(self._sequence(prefix, ids[:kept], None, [n_out]))
                spans.append((start, end, kept, kept < len(ids)))
                n_out += 1
            elif mode == "chunk":
                for a, b in windows(len(ids), chunk_tokens, overlap):
                    sequences.append(self._sequence(prefix, ids[a:b], None, [n_out]))
                    spans.append((*char_span(offsets, a, b, len(text)), b - a, False))
                    n_out += 1
            else:  # late: one pass per block of `room` tokens, pooled per window inside it
                for block_start in range(0, max(len(ids), 1), room):
                    block = ids[block_start : block_start + room]
                    local = windows(len(block), chunk_tokens, overlap)
                    outputs = list(range(n_out, n_out + len(local)))
                    sequences.append(self._sequence(prefix, block, local, outputs))
                    for a, b in local:
                        a_abs, b_abs = block_start + a, block_start + b
                        spans.append((*char_span(offsets, a_abs, b_abs, len(text)), b - a, False))
                    n_out += len(local)
            if head:
                kept = min(len(ids), room)
                if mode == "full" or (mode == "chunk" and spans[0][2] == kept):
                    heads.append((first_out, kept, kept < len(ids)))  # the first chunk is the head itself
                else:  # row filled in below
                    heads.append((-1, kept, kept < len(ids)))
                    if mode == "late":  # the first pass is the head's tokens: pool all of it once more
                        late_heads.append((len(heads) - 1, sequences[first]))
                    else:
                        own_heads.append((len(heads) - 1, self._sequence(prefix, ids[:kept], None, [])))
            layout.append(spans)
            fed.append(sum(len(s.ids) for s in sequences[first:]))
        for i, seq in late_heads:
            seq.pool_spans.append((0, len(seq.ids)))
            seq.outputs.append(n_out)
            heads[i] = (n_out, *heads[i][1:])
            n_out += 1
        for i, seq in own_heads:
            seq.outputs.append(n_out)
            sequences.append(seq)
            fed[i] += len(seq.ids)
            heads[i] = (n_out, *heads[i][1:])
            n_out += 1
        return Plan(sequences, layout, n_out, fed, heads)

    @torch.inference_mode()
    def run_sequences(
        self,
        sequences: list[Sequence],
        n_out: int,
        batch_tokens: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """(n_out, dim) float32: each sequence's pooled rows at its `outputs` indices, in token-budget
        batches of `batch_tokens` (default: DEFAULT_BATCH_TOKENS for the device)."""
        out = np.zeros((n_out, self.info.dim), dtype=np.float32)
        if batch_tokens is None:
            batch_tokens = DEFAULT_BATCH_TOKENS.get(self.device.type, 16384)
        lengths = [len(s.ids) for s in sequences]
        bar = tqdm(total=sum(lengths), unit="tok", unit_scale=True, disable=not progress, leave=False)
        for batch_ids in plan_batches(lengths, batch_tokens):
            batch = [sequences[i] for i in batch_ids]
            out[[k for s in batch for k in s.outputs]] = self.forward_batch(batch)
            bar.update(sum(lengths[i] for i in batch_ids))
        bar.close()
        return out

    def forward_batch(self, sequences: list[Sequence], spare_cores: bool = False) -> np.ndarray:
        """One packed forward pass: float32 rows, one per pool span, in the order of the sequences and
        their spans (their `outputs` indices are not used here). With an ONNX Runtime encoder, batches
        of at most onnx_cpu.SMALL_BATCH_TOKENS (queries) run on it and larger ones on the packed PyTorch
        path, which was faster for bulk work in bench/RESULTS.md; LONGEMBED_KERNELS=triton forces
        the kernels. spare_cores: nothing else needs the machine's other cores now (the host's batcher
        says so for a lone query), so a small batch may run on ONNX Runtime's query session."""
        small = sum(len(s.ids) for s in sequences) <= onnx_cpu.SMALL_BATCH_TOKENS
        if self._onnx is None or not small or triton_kernels.backend(self.device) == "triton":
            return self._forward_torch(sequences)
        return self._onnx.forward(sequences, spare_cores=spare_cores)

    @torch.inference_mode()
    def _forward_torch(self, sequences: list[Sequence]) -> np.ndarray:
        batch = pack(sequences, self.device)
        hidden = self.module(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        return triton_kernels.mean_pool_normalize(hidden, batch.pool_spans).float().cpu().numpy()

    def room(self, kind: str = "document", instruction: str | None = None) -> int:
        """Content tokens that fit in one sequence beside [CLS], [SEP] and the prefix."""
        return self.info.max_tokens - 2 - len(self._prefix(kind, instruction))

    def count_tokens(self, texts: Seq[str]) -> list[int]:
        """Tokens per text, without special tokens or prefixes."""
        encodings = self._m.tokenizer.encode_batch(list(_check_texts(texts)), add_special_tokens=False)
        return [len(e.ids) for e in encodings]

    # -- internals ---------------------------------------------------------------------------

    def _select_cpu_backend(self) -> tuple[onnx_cpu.OnnxEncoder | None, str]:
        """(ONNX Runtime encoder or None, why not): fp32 CPU models go on ONNX Runtime unless
        LONGEMBED_CPU_BACKEND says torch or the export cannot be trusted (onnx_cpu.py)."""
        if self.device.type != "cpu":
            return None, ""
        choice = onnx_cpu.backend_choice()
        if choice == "torch":
            return None, "LONGEMBED_CPU_BACKEND=torch"
        if self.dtype != torch.float32:
            reason = f"{DTYPE_NAMES[self.dtype]} runs on PyTorch (ONNX Runtime serves fp32 only)"
            if choice == "onnx":
                raise ValueError(f"LONGEMBED_CPU_BACKEND=onnx: {reason}")
            return None, reason
        m = self._m
        try:
            encoder = onnx_cpu.load_onnx(
                self.module,
                m.architecture,
                m.config,
                m.name,
                m.folder,
                m.revision,
                self._forward_torch,
                m.config.vocab_size,
                m.max_tokens,
            )
        except onnx_cpu.OnnxUnavailable as exc:
            if choice == "onnx":
                raise
            log.warning("%s stays on PyTorch on the CPU: %s", m.name, exc)
            return None, str(exc)
        return encoder, ""

    def _tokenize(self, texts: list[str], keep: int | None) -> list:
        """Encodings with character offsets. With `keep`, only a text's first `keep` tokens matter
        (full mode): a long text is tokenised up to a whitespace boundary far enough in to yield
        more than `keep` tokens, so a 100 MB text costs what its head costs. Tokens before a
        whitespace boundary do not depend on what follows it."""
        tokenizer = self._m.tokenizer
        if keep is None:
            return tokenizer.encode_batch(texts, add_special_tokens=False)
        limit = keep * HEAD_CHARS_PER_TOKEN
        heads = [_head(text, limit) for text in texts]
        encodings = tokenizer.encode_batch(heads, add_special_tokens=False)
        for i, (text, head) in enumerate(zip(texts, heads, strict=True)):
            if head is not text and len(encodings[i].ids) <= keep:  # the head was too short: all of it
                encodings[i] = tokenizer.encode(text, add_special_tokens=False)
        return encodings

    def _prefix(self, kind: str, instruction: str | None) -> list[int]:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if instruction is not None and not isinstance(instruction, str):
            raise TypeError(f"instruction must be a string, got {type(instruction).__name__}")
        text = instruction if instruction is not None else self.info.prefixes[kind]
        if text not in self._prefix_ids:
            ids = self._m.tokenizer.encode(text, add_special_tokens=False).ids if text else []
            self._prefix_ids[text] = ids
        return self._prefix_ids[text]

    def _sequence(
        self,
        prefix: list[int],
        content: list[int],
        windows_: list[tuple[int, int]] | None,
        outputs: list[int],
    ) -> Sequence:
        ids = [self._m.cls_id, *prefix, *content, self._m.sep_id]
        if windows_ is not None:  # late chunking: pool each window's own token rows
            first = 1 + len(prefix)
            spans = [(first + a, first + b) for a, b in windows_]
            if not content:  # an empty text has one empty window: pool [CLS][SEP] instead
                spans = [(0, len(ids))]
        elif self.info.pooling == "cls":
            spans = [(0, 1)]
        else:  # mean over every token, special tokens included, as sentence-transformers does
            spans = [(0, len(ids))]
        return Sequence(ids, spans, outputs)


def _head(text: str, limit: int) -> str:
    """`text` cut at the last whitespace before `limit` characters (the text itself if shorter)."""
    if len(text) <= limit:
        return text
    cut = max(text.rfind(space, 0, limit) for space in " \n\t\r")
    return text[:cut] if cut > 0 else text


def _check_texts(texts: Seq[str]) -> list[str]:
    if isinstance(texts, str | bytes):
        raise TypeError("texts must be a list of strings, not a single string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
        if not text.isascii():  # lone surrogates (legal in JSON strings) cannot reach the tokenizer
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(
                    f"texts[{i}] is not valid Unicode: {exc.reason} at character {exc.start}"
                ) from None
    return texts


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    max_tokens: int | None = None,
) -> EmbeddingModel:
    """Load a model: None for the bundled all-MiniLM-L6-v2, else a local folder or a hub id.

    device defaults to CUDA when available, else CPU; dtype to bf16 on CUDA and fp32 on CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    if dtype is None:
        torch_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dev.type == "cpu" and torch_dtype == torch.float16:
        raise ValueError("fp16 is not supported on CPU (slow and inexact there); use fp32 or bf16")
    return EmbeddingModel(load(name_or_path, max_tokens=max_tokens), dev, torch_dtype)
