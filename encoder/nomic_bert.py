"""NomicBERT (nomic-bert-2048, nomic-embed-text v1/v1.5) on packed batches.

Differences from BERT (encoder/bert.py), after Nomic's reference model (`modeling_hf_nomic_bert.py`,
loaded with trust_remote_code) and transformers' own `nomic_bert`:
- no position embeddings: rotary positions (GPT-NeoX halves, base `rotary_emb_base`) rotate q and k of
  every head; positions restart at 0 in every packed sequence;
- dynamic NTK scaling (only when config.json sets `rotary_scaling_factor`): a sequence of L tokens,
  L > `max_trained_positions` (2048), rotates with the base
      base * (factor * L / max_trained - (factor - 1)) ** (d / (d - 2))
  as the reference computes it for a batch of that one text. The reference scales by the padded batch
  length (and keeps the scaled table for later calls); we scale each packed sequence by its own length,
  so a text's vector does not depend on what it is batched with;
- fused Wqkv, no biases on the attention and MLP linears; SwiGLU MLP: fc2(fc11(x) * silu(fc12(x)));
- post-LayerNorm blocks (norm1 after attention, norm2 after the MLP), `emb_ln` after the embeddings.

Two checkpoint layouts load by exact key map: Nomic's (`emb_ln`, `encoder.layers.N.attn.Wqkv`, ...,
`bert.` under NomicBertForPreTraining) and transformers' (`embeddings.LayerNorm`,
`layers.N.self_attn.q_proj`, ..., `nomic_bert.` under NomicBertForMaskedLM); config.json may use either
naming (`n_embd`, `rotary_emb_base`, ... or `hidden_size`, `rope_parameters`, ...).
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

GATE_ACTIVATIONS = {"silu": F.silu, "gelu": lambda x: F.gelu(x), "sigmoid": torch.sigmoid}
# Nomic's `activation_function` names the gated MLP by its gate's activation.
NOMIC_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "glu": "sigmoid"}


@dataclass(frozen=True)
class NomicBertConfig:
    vocab_size: int = 30528
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "silu"  # of the gate: SwiGLU
    max_position_embeddings: int = 8192  # the longest sequence we run (rotary has no table)
    max_trained_positions: int = 2048  # dynamic NTK scales sequences longer than this
    rotary_emb_base: float = 1000.0
    rotary_scaling_factor: float | None = None  # None: plain rotary at every length
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        assert self.hidden_size % self.num_attention_heads == 0, "hidden_size must divide into heads"
        assert (self.hidden_size // self.num_attention_heads) % 2 == 0, "rotary needs an even head size"
        assert self.hidden_act in GATE_ACTIVATIONS, f"unsupported hidden_act {self.hidden_act!r}"


def inverse_frequencies(base: float, dim: int) -> torch.Tensor:
    """(dim / 2,) float32 rotation speeds, computed as the reference does (fp32 exponents)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def ntk_base(config: NomicBertConfig, length: int, dim: int) -> float:
    """The rotary base for a sequence of `length` tokens (dynamic NTK beyond the trained length)."""
    factor, trained = config.rotary_scaling_factor, config.max_trained_positions
    if factor is None or length <= trained:
        return config.rotary_emb_base
    return config.rotary_emb_base * (factor * length / trained - (factor - 1)) ** (dim / (dim - 2))


def rotary_tables(
    config: NomicBertConfig, position_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, dim / 2), float32, for every packed token at its position in its sequence."""
    device = position_ids.device
    if config.rotary_scaling_factor is None or max_seqlen <= config.max_trained_positions:
        inv_freq = inverse_frequencies(config.rotary_emb_base, dim).to(device)[None]  # one base for all
    else:  # each sequence its own base; this branch is the only host sync, for long batches only
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        per_sequence = torch.stack([inverse_frequencies(ntk_base(config, n, dim), dim) for n in lengths])
        inv_freq = per_sequence.to(device).repeat_interleave(
            torch.tensor(lengths, device=device), dim=0, output_size=position_ids.shape[0]
        )
    angles = position_ids.to(torch.float32)[:, None] * inv_freq  # fp32: positions up to 8191
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    def __init__(self, config: NomicBertConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)  # q, k, v stacked
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        total, hidden = x.shape
        head_dim = hidden // self.heads
        qkv = self.qkv(x).view(total, 3, self.heads, head_dim)
        triton_kernels.rotary_qk_(qkv, cos, sin)  # q and k in place (GPT-NeoX halves)
        q, k, v = qkv.unbind(1)  # 3 x (T, nh, hd)
        ctx = triton_kernels.attention(q, k, v, cu_seqlens, max_seqlen, None, scale=1.0 / math.sqrt(head_dim))
        return self.out(ctx.reshape(total, hidden))


class GatedMLP(nn.Module):
    def __init__(self, config: NomicBertConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # Nomic's fc11
        self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # fc12
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # fc2
        self.act = GATE_ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x) * self.act(self.gate(x)))


class Layer(nn.Module):
    def __init__(self, config: NomicBertConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GatedMLP(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = self.norm1(self.attention(x, cu_seqlens, max_seqlen, cos, sin) + x)
        return self.norm2(self.mlp(x) + x)


class NomicBert(nn.Module):
    def __init__(self, config: NomicBertConfig) -> None:
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.embedding_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) all sequences of the batch, concatenated
        position_ids: torch.Tensor,  # (T,) 0.. within each sequence: rotary restarts per sequence
        cu_seqlens: torch.Tensor,  # (n + 1,) int32 offsets
        max_seqlen: int,
    ) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = self.embedding_norm(x)  # (T, hidden)
        # One table for all layers, in fp32 whatever the model's dtype (angles reach 8191 radians).
        cos, sin = rotary_tables(self.config, position_ids, cu_seqlens, max_seqlen, self.head_dim)
        for layer in self.layers:
            x = layer(x, cu_seqlens, max_seqlen, cos, sin)
        return x


def key_map(config: NomicBertConfig, checkpoint_keys: Collection[str] = ()) -> KeyMap:
    """Every checkpoint key -> ours and its shape, in the layout the checkpoint uses: transformers'
    when its keys are (`layers.N.self_attn.q_proj`), else Nomic's (`encoder.layers.N.attn.Wqkv`)."""
    h, inter = config.hidden_size, config.intermediate_size
    keys: KeyMap = {
        "embeddings.word_embeddings.weight": ("word_embeddings.weight", (config.vocab_size, h)),
        "embeddings.token_type_embeddings.weight": (
            "token_type_embeddings.weight",
            (config.type_vocab_size, h),
        ),
    }
    if any(k.startswith("layers.") for k in checkpoint_keys):  # transformers' NomicBertModel
        layer_norm(keys, "embeddings.LayerNorm", "embedding_norm", h)
        for i in range(config.num_hidden_layers):
            hf, ours = f"layers.{i}.", f"layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj"):  # concatenated in this order into qkv
                linear(keys, f"{hf}self_attn.{name}", f"{ours}attention.qkv", h, h, bias=False)
            linear(keys, hf + "self_attn.o_proj", ours + "attention.out", h, h, bias=False)
            layer_norm(keys, hf + "post_attention_layernorm", ours + "norm1", h)
            linear(keys, hf + "mlp.up_proj", ours + "mlp.up", inter, h, bias=False)
            linear(keys, hf + "mlp.gate_proj", ours + "mlp.gate", inter, h, bias=False)
            linear(keys, hf + "mlp.down_proj", ours + "mlp.down", h, inter, bias=False)
            layer_norm(keys, hf + "post_mlp_layernorm", ours + "norm2", h)
        return keys
    layer_norm(keys, "emb_ln", "embedding_norm", h)
    for i in range(config.num_hidden_layers):
        hf, ours = f"encoder.layers.{i}.", f"layers.{i}."
        linear(keys, hf + "attn.Wqkv", ours + "attention.qkv", 3 * h, h, bias=False)
        linear(keys, hf + "attn.out_proj", ours + "attention.out", h, h, bias=False)
        layer_norm(keys, hf + "norm1", ours + "norm1", h)
        linear(keys, hf + "mlp.fc11", ours + "mlp.up", inter, h, bias=False)
        linear(keys, hf + "mlp.fc12", ours + "mlp.gate", inter, h, bias=False)
        linear(keys, hf + "mlp.fc2", ours + "mlp.down", h, inter, bias=False)
        layer_norm(keys, hf + "norm2", ours + "norm2", h)
    return keys


def _is_nomic_naming(raw: dict) -> bool:
    return "n_embd" in raw


# Nomic config.json settings with only one value implemented here: key -> (that value, the reference's
# default when config.json omits the key). Published models set them all; anything else is refused by name
# rather than run wrongly.
NOMIC_FIXED = {
    "prenorm": (False, False),
    "causal": (False, False),
    "rotary_emb_fraction": (1.0, 0.0),
    "rotary_emb_interleaved": (False, False),
    "rotary_emb_scale_base": (None, None),
    "qkv_proj_bias": (False, True),
    "mlp_fc1_bias": (False, True),
    "mlp_fc2_bias": (False, True),
    "parallel_block": (False, False),
    "use_rms_norm": (False, False),
}


def _check(raw: dict, path: Path) -> None:
    if _is_nomic_naming(raw):
        for key, (wanted, default) in NOMIC_FIXED.items():
            if raw.get(key, default) != wanted:
                raise ModelLoadError(
                    f"{path}: NomicBERT with {key}={raw.get(key, default)!r} is not supported "
                    f"(published models: {wanted!r})"
                )
        activation = raw.get("activation_function", "gelu_new")  # GPT2Config's default
        if activation not in NOMIC_ACTIVATIONS:
            raise ModelLoadError(
                f"{path}: NomicBERT activation_function {activation!r} is not supported "
                f"(gated MLPs only: {sorted(NOMIC_ACTIVATIONS)})"
            )
        if raw.get("num_heads_kv") not in (None, raw.get("n_head")):
            raise ModelLoadError(
                f"{path}: NomicBERT with num_heads_kv (grouped-query attention) is not supported"
            )
        return
    rope = raw.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") not in ("default", "dynamic"):
        raise ModelLoadError(
            f"{path}: NomicBERT rope_parameters {rope!r} are not supported (default or dynamic)"
        )
    if raw.get("head_dim") not in (None, raw.get("hidden_size", 768) // raw.get("num_attention_heads", 12)):
        raise ModelLoadError(f"{path}: NomicBERT head_dim {raw['head_dim']!r} != hidden_size / heads")


def _config_fields(raw: dict) -> dict:
    """config.json in either naming -> NomicBertConfig fields."""
    if not _is_nomic_naming(raw):  # transformers' NomicBertConfig
        fields = dict(raw)
        rope = raw.get("rope_parameters") or {}
        fields["rotary_emb_base"] = rope.get("rope_theta", raw.get("rope_theta", 1000.0))
        trained = raw.get("max_position_embeddings", 2048)
        fields["max_trained_positions"] = trained
        if rope.get("rope_type") == "dynamic":
            # transformers' factor stretches the trained context: run up to that.
            fields["rotary_scaling_factor"] = rope.get("factor")
            if type(trained) is int and type(rope.get("factor")) in (int, float):
                fields["max_position_embeddings"] = int(trained * rope["factor"])
        return fields
    fields = {  # defaults: Nomic's NomicBertConfig and the GPT2Config under it
        "vocab_size": raw.get("vocab_size", 50257),
        "hidden_size": raw.get("n_embd"),
        "num_hidden_layers": raw.get("n_layer"),
        "num_attention_heads": raw.get("n_head"),
        "hidden_act": NOMIC_ACTIVATIONS[raw["activation_function"]],  # _check: present and gated
        "max_position_embeddings": raw.get("n_positions", 1024),
        "max_trained_positions": raw.get("max_trained_positions", 2048),
        "rotary_emb_base": raw.get("rotary_emb_base", 10000.0),
        "rotary_scaling_factor": raw.get("rotary_scaling_factor"),
        "type_vocab_size": raw.get("type_vocab_size", 2),
        "layer_norm_eps": raw.get("layer_norm_epsilon", 1e-5),
    }
    # The reference pads the vocabulary up to a multiple, and sizes an unset n_inner from n_embd.
    multiple = raw.get("pad_vocab_size_multiple", 1)
    if type(fields["vocab_size"]) is int and type(multiple) is int and multiple > 0:
        fields["vocab_size"] = -(-fields["vocab_size"] // multiple) * multiple
    inner = raw.get("n_inner")
    if inner is None and type(fields["hidden_size"]) is int:
        inner = -(-int(8 * fields["hidden_size"] / 3) // 256) * 256
    fields["intermediate_size"] = inner
    return {k: v for k, v in fields.items() if v is not None or k == "rotary_scaling_factor"}


ARCHITECTURE = Architecture(
    name="nomic_bert",
    description="NomicBERT (nomic-embed-text v1/v1.5)",
    model_type="nomic_bert",
    config_class=NomicBertConfig,
    module_class=NomicBert,
    key_map=key_map,
    check=_check,
    config_fields=_config_fields,
    checkpoint_prefixes=("bert.", "nomic_bert."),
)
