"""BERT encoder (absolute positions: MiniLM, BGE, E5, GTE-v1) over packed varlen batches.

The whole forward pass is in this file. Inputs are packed: all tokens of a batch in one
(total_tokens,) tensor with `cu_seqlens` offsets, so no FLOP goes to padding. The maths follows
Hugging Face `modeling_bert.py` (post-LayerNorm blocks); the test suite checks our vectors against
`transformers` / sentence-transformers on real weights.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from longembed import triton_kernels
from longembed.encoder.architecture import Architecture, KeyMap, layer_norm, linear
from longembed.encoder.files import ModelLoadError

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


def attention_keys(keys: KeyMap, hf: str, ours: str, hidden: int) -> None:
    """One layer's self-attention: checkpoint keys under `hf` -> ours under `ours`; Q, K and V (in that
    order) concatenate into the fused `qkv`."""
    for name in ("query", "key", "value"):
        linear(keys, f"{hf}attention.self.{name}", f"{ours}attention.qkv", hidden, hidden)
    linear(keys, f"{hf}attention.output.dense", f"{ours}attention.dense", hidden, hidden)
    layer_norm(keys, f"{hf}attention.output.LayerNorm", f"{ours}attention.norm", hidden)


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


def key_map(config: BertConfig, checkpoint_keys: Collection[str] = ()) -> KeyMap:
    """Every checkpoint key of a Hugging Face BERT (without `bert.`) -> our parameter and its shape."""
    h, inter = config.hidden_size, config.intermediate_size
    keys: KeyMap = {
        "embeddings.word_embeddings.weight": ("word_embeddings.weight", (config.vocab_size, h)),
        "embeddings.position_embeddings.weight": (
            "position_embeddings.weight",
            (config.max_position_embeddings, h),
        ),
        "embeddings.token_type_embeddings.weight": (
            "token_type_embeddings.weight",
            (config.type_vocab_size, h),
        ),
    }
    layer_norm(keys, "embeddings.LayerNorm", "embedding_norm", h)
    for i in range(config.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}.", f"layers.{i}."
        attention_keys(keys, hf, ours, h)
        linear(keys, hf + "intermediate.dense", ours + "mlp.up", inter, h)
        linear(keys, hf + "output.dense", ours + "mlp.down", h, inter)
        layer_norm(keys, hf + "output.LayerNorm", ours + "mlp.norm", h)
    return keys


def _check(raw: dict, path: Path) -> None:
    position = raw.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise ModelLoadError(f"{path}: position_embedding_type {position!r} is not supported")


ARCHITECTURE = Architecture(
    name="bert",
    description="BERT (MiniLM, BGE, E5, GTE-v1)",
    model_type="bert",
    config_class=BertConfig,
    module_class=Bert,
    key_map=key_map,
    claims=lambda raw: raw.get("position_embedding_type", "absolute") != "alibi",
    check=_check,
)
