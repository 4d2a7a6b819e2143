"""JinaBERT (jina-embeddings-v2 small/base: ALiBi, GEGLU, post-LayerNorm, 8192 tokens) on packed batches.

Differences from BERT (encoder/bert.py), after the published configs and Jina's reference model:
- no position embeddings: attention adds a symmetric ALiBi bias -m_h * |i - j| per head, computed
  inside the attention op from per-head slopes, never materialised as (heads, n, n);
- the MLP is gated: `gated_layers` Linear(h, 2I, no bias) -> gelu(first half) * second half ->
  `wo` Linear(I, h) -> LayerNorm(out + residual), the LayerNorm named `mlp.layernorm`.
Self-attention (Q, K, V with bias, output dense, post-LayerNorm) is BERT's, reused from bert.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from longembed.encoder.architecture import Architecture, KeyMap, layer_norm, linear
from longembed.encoder.bert import SelfAttention, attention_keys
from longembed.encoder.files import ModelLoadError

GATED_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU: `hidden_act: gelu` in the published configs
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,  # feed_forward_type "reglu"
}


@dataclass(frozen=True)
class JinaBertConfig:
    vocab_size: int = 30528
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 8192  # ALiBi has no table; this is the trained context length
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        assert self.hidden_size % self.num_attention_heads == 0, "hidden_size must divide into heads"
        assert self.hidden_act in GATED_ACTIVATIONS, f"unsupported hidden_act {self.hidden_act!r}"


def alibi_slopes(heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes: the geometric sequence 2^(-8i/n) for the nearest power of two n <= heads,
    then every other slope of the sequence for 2n to fill the remaining heads (Press et al.)."""

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    n = 2 ** math.floor(math.log2(heads))
    slopes = power_of_two(n) + power_of_two(2 * n)[0::2][: heads - n]
    return torch.tensor(slopes, dtype=torch.float32)


class GatedMLP(nn.Module):
    def __init__(self, config: JinaBertConfig) -> None:
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gated_layers = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = GATED_ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated, plain = self.gated_layers(x).split(self.intermediate, dim=-1)  # 2 x (T, I)
        return self.norm(self.wo(self.act(gated) * plain) + x)


class Layer(nn.Module):
    def __init__(self, config: JinaBertConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config.hidden_size, config.num_attention_heads, config.layer_norm_eps)
        self.mlp = GatedMLP(config)

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, slopes: torch.Tensor
    ) -> torch.Tensor:
        return self.mlp(self.attention(x, cu_seqlens, max_seqlen, slopes))


class JinaBert(nn.Module):
    def __init__(self, config: JinaBertConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.embedding_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        # A plain attribute, not a buffer: casting the model to bf16/fp16 must not round the slopes,
        # which multiply distances up to 8191.
        self.slopes = alibi_slopes(config.num_attention_heads)

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) all sequences of the batch, concatenated
        position_ids: torch.Tensor | None,  # unused: ALiBi needs no positions; kept for one signature
        cu_seqlens: torch.Tensor,  # (n + 1,) int32 offsets
        max_seqlen: int,
    ) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = self.embedding_norm(x)  # (T, hidden)
        slopes = self.slopes.to(x.device)
        for layer in self.layers:
            x = layer(x, cu_seqlens, max_seqlen, slopes)
        return x


def key_map(config: JinaBertConfig, checkpoint_keys: Collection[str] = ()) -> KeyMap:
    """Every checkpoint key of jina-embeddings-v2 (BERT names, without `bert.`) -> ours and its shape."""
    h, inter = config.hidden_size, config.intermediate_size
    keys: KeyMap = {
        "embeddings.word_embeddings.weight": ("word_embeddings.weight", (config.vocab_size, h)),
        "embeddings.token_type_embeddings.weight": (
            "token_type_embeddings.weight",
            (config.type_vocab_size, h),
        ),
    }
    layer_norm(keys, "embeddings.LayerNorm", "embedding_norm", h)
    for i in range(config.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}.", f"layers.{i}."
        attention_keys(keys, hf, ours, h)
        # gate and value halves stacked, no bias
        linear(keys, hf + "mlp.gated_layers", ours + "mlp.gated_layers", 2 * inter, h, bias=False)
        linear(keys, hf + "mlp.wo", ours + "mlp.wo", h, inter)
        layer_norm(keys, hf + "mlp.layernorm", ours + "mlp.norm", h)
    return keys


def _check(raw: dict, path: Path) -> None:
    variant = json.dumps(raw.get("auto_map", {})) + str(raw.get("_name_or_path", ""))
    if "qk-post-norm" in variant:
        raise ModelLoadError(
            f"{path}: JinaBERT variant 'jina-bert-v2-qk-post-norm' (the code model: q/k LayerNorm, "
            "swapped GLU halves) is not supported; supported: jina-embeddings-v2 small/base "
            "(en, de, es, zh)"
        )
    if raw.get("feed_forward_type", "geglu") != "geglu":
        raise ModelLoadError(
            f"{path}: JinaBERT feed_forward_type {raw['feed_forward_type']!r} is not supported (only 'geglu')"
        )


ARCHITECTURE = Architecture(
    name="jina_bert",
    description="JinaBERT (jina-embeddings-v2)",
    model_type="bert",
    config_class=JinaBertConfig,
    module_class=JinaBert,
    key_map=key_map,
    claims=lambda raw: raw.get("position_embedding_type", "absolute") == "alibi",
    check=_check,
)
