"""BERT encoder (absolute positions: MiniLM, BGE, E5, GTE-v1) over packed varlen batches.

The whole forward pass is in this file. Inputs are packed: all tokens of a batch in one
(total_tokens,) tensor with `cu_seqlens` offsets, so no FLOP goes to padding. The maths follows
Hugging Face `modeling_bert.py` (post-LayerNorm blocks); the test suite checks our vectors against
`transformers` / sentence-transformers on real weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longembed import triton_kernels

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU, as in the original BERT
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        assert self.hidden_size % self.num_attention_heads == 0, "hidden_size must divide into heads"
        assert self.hidden_act in ACTIVATIONS, f"unsupported hidden_act {self.hidden_act!r}"


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused QKV projection, output dense and post-LayerNorm."""

    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)  # query, key, value stacked along dim 0
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        alibi_slopes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        total, hidden = x.shape
        head_dim = hidden // self.heads
        q, k, v = self.qkv(x).view(total, 3, self.heads, head_dim).unbind(1)  # 3 x (T, nh, hd)
        ctx = triton_kernels.attention(
            q, k, v, cu_seqlens, max_seqlen, alibi_slopes, scale=1.0 / math.sqrt(head_dim)
        )
        return self.norm(self.dense(ctx.reshape(total, hidden)) + x)


def attention_state(state: dict[str, torch.Tensor], hf: str, ours: str) -> dict[str, torch.Tensor]:
    """One layer's self-attention weights, checkpoint keys under `hf` -> ours under `ours`."""
    mapped = {}
    for kind in ("weight", "bias"):
        qkv = [state[f"{hf}attention.self.{p}.{kind}"] for p in ("query", "key", "value")]
        mapped[f"{ours}attention.qkv.{kind}"] = torch.cat(qkv)
        mapped[f"{ours}attention.dense.{kind}"] = state[f"{hf}attention.output.dense.{kind}"]
        mapped[f"{ours}attention.norm.{kind}"] = state[f"{hf}attention.output.LayerNorm.{kind}"]
    return mapped


def attention_shapes(hf: str, hidden: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint shapes of one layer's self-attention under `hf`."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ("self.query", "self.key", "self.value", "output.dense"):
        shapes[f"{hf}attention.{name}.weight"] = (hidden, hidden)
        shapes[f"{hf}attention.{name}.bias"] = (hidden,)
    shapes[f"{hf}attention.output.LayerNorm.weight"] = shapes[f"{hf}attention.output.LayerNorm.bias"] = (
        hidden,
    )
    return shapes


class MLP(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(self.act(self.up(x))) + x)


class Layer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config.hidden_size, config.num_attention_heads, config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        return self.mlp(self.attention(x, cu_seqlens, max_seqlen))


class Bert(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.embedding_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) all sequences of the batch, concatenated
        position_ids: torch.Tensor,  # (T,) 0.. within each sequence
        cu_seqlens: torch.Tensor,  # (n + 1,) int32 offsets
        max_seqlen: int,
    ) -> torch.Tensor:
        # Single-segment inputs: token type 0 everywhere.
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings.weight[0]
        )
        x = self.embedding_norm(x)  # (T, hidden)
        for layer in self.layers:
            x = layer(x, cu_seqlens, max_seqlen)
        return x

    @classmethod
    def from_state_dict(cls, config: BertConfig, state: dict[str, torch.Tensor]) -> Bert:
        """Build from a Hugging Face BERT state dict (keys without the `bert.` prefix)."""
        model = cls(config)
        mapped: dict[str, torch.Tensor] = {
            "word_embeddings.weight": state["embeddings.word_embeddings.weight"],
            "position_embeddings.weight": state["embeddings.position_embeddings.weight"],
            "token_type_embeddings.weight": state["embeddings.token_type_embeddings.weight"],
            "embedding_norm.weight": state["embeddings.LayerNorm.weight"],
            "embedding_norm.bias": state["embeddings.LayerNorm.bias"],
        }
        for i in range(config.num_hidden_layers):
            hf, ours = f"encoder.layer.{i}.", f"layers.{i}."
            mapped |= attention_state(state, hf, ours)
            for kind in ("weight", "bias"):
                mapped[ours + f"mlp.up.{kind}"] = state[hf + f"intermediate.dense.{kind}"]
                mapped[ours + f"mlp.down.{kind}"] = state[hf + f"output.dense.{kind}"]
                mapped[ours + f"mlp.norm.{kind}"] = state[hf + f"output.LayerNorm.{kind}"]
        model.load_state_dict(mapped, strict=True)  # raises on any missing key or shape mismatch
        return model

    @staticmethod
    def expected_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
        """Every checkpoint key the model reads and its shape (to name missing, unused, misshapen weights)."""
        h, inter = config.hidden_size, config.intermediate_size
        shapes = {
            "embeddings.word_embeddings.weight": (config.vocab_size, h),
            "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
            "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
            "embeddings.LayerNorm.weight": (h,),
            "embeddings.LayerNorm.bias": (h,),
        }
        for i in range(config.num_hidden_layers):
            p = f"encoder.layer.{i}."
            shapes |= attention_shapes(p, h)
            for name, out, in_ in (("intermediate.dense", inter, h), ("output.dense", h, inter)):
                shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (out, in_), (out,)
            shapes[p + "output.LayerNorm.weight"] = shapes[p + "output.LayerNorm.bias"] = (h,)
        return shapes
