"""NomicBERT on packed batches against transformers' own `NomicBertModel` (an independent implementation:
padded batches, its own rotary and dynamic-NTK code), on tiny random checkpoints that this file writes in
both layouts users have: Nomic's trust_remote_code one and transformers' one."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer

from longembed.encoder import ModelLoadError, load_model
from longembed.encoder.chunking import windows
from longembed.encoder.nomic_bert import ntk_base
from longembed.encoder.profiles import profile_for, truncate_dim
from tests.jina_reference import TOKENIZER_CONFIG, minilm_folder

# nomic-embed-text-v1.5's config.json (trust_remote_code naming); sizes are overridden per test.
NOMIC_CONFIG = {
    "_name_or_path": "nomic-ai/nomic-bert-2048",
    "activation_function": "swiglu",
    "architectures": ["NomicBertModel"],
    "attn_pdrop": 0.0,
    "auto_map": {
        "AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
        "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel",
    },
    "bos_token_id": None,
    "causal": False,
    "dense_seq_output": True,
    "embd_pdrop": 0.0,
    "eos_token_id": None,
    "fused_bias_fc": True,
    "fused_dropout_add_ln": True,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-12,
    "max_trained_positions": 2048,
    "mlp_fc1_bias": False,
    "mlp_fc2_bias": False,
    "model_type": "nomic_bert",
    "n_embd": 768,
    "n_head": 12,
    "n_inner": 3072,
    "n_layer": 12,
    "n_positions": 8192,
    "pad_vocab_size_multiple": 64,
    "parallel_block": False,
    "parallel_block_tied_norm": False,
    "prenorm": False,
    "qkv_proj_bias": False,
    "reorder_and_upcast_attn": False,
    "resid_pdrop": 0.0,
    "rotary_emb_base": 1000,
    "rotary_emb_fraction": 1.0,
    "rotary_emb_interleaved": False,
    "rotary_emb_scale_base": None,
    "rotary_scaling_factor": None,
    "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True,
    "torch_dtype": "float32",
    "type_vocab_size": 2,
    "use_cache": True,
    "use_flash_attn": True,
    "use_rms_norm": False,
    "use_xentropy": True,
    "vocab_size": 30528,
}
# (heads, hidden): head dims 16, 8, 8, 16 (6 heads: not a power of two).
SHAPES = [(4, 64), (8, 64), (6, 48), (2, 32)]
TEXTS = [
    "",
    "a",
    "hello world",
    "The quick brown fox jumps over the lazy dog. " * 30,
    "naïve café in 北京, 😀; code: `x = f(y) + 1`\n\n\tindented   spaces",
    "Rotary positions restart in every packed sequence. " * 6,
]


def nomic_config(heads: int, hidden: int, layers: int = 2, inner: int = 96, **overrides) -> dict:
    config = dict(NOMIC_CONFIG)
    config.update(n_head=heads, n_embd=hidden, n_layer=layers, n_inner=inner)
    config.update(overrides)
    return config


def random_state(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Nomic-layout tensors (no prefix), float32, larger than the 0.02 init so that attention is far
    from uniform and a wrong rotation, base or GLU half moves the vectors by far more than 1e-5."""
    g = torch.Generator().manual_seed(seed)
    h, inner = config["n_embd"], config["n_inner"]

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1.0 + normal(h, std=0.1), f"{prefix}.bias": normal(h, std=0.1)}

    state = {
        "embeddings.word_embeddings.weight": normal(config["vocab_size"], h, std=1.0),
        "embeddings.token_type_embeddings.weight": normal(2, h, std=1.0),
        **norm("emb_ln"),
    }
    w = 1.0 / math.sqrt(h)
    for i in range(config["n_layer"]):
        p = f"encoder.layers.{i}."
        state[p + "attn.Wqkv.weight"] = normal(3 * h, h, std=2.0 * w)
        state[p + "attn.out_proj.weight"] = normal(h, h, std=w)
        state.update(norm(p + "norm1"))
        state[p + "mlp.fc11.weight"] = normal(inner, h, std=w)
        state[p + "mlp.fc12.weight"] = normal(inner, h, std=w)
        state[p + "mlp.fc2.weight"] = normal(h, inner, std=1.0 / math.sqrt(inner))
        state.update(norm(p + "norm2"))
    return state


def transformers_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under transformers' NomicBertModel names (written out by hand, as its
    conversion mapping renames them: Wqkv split in three, fc11 -> up_proj, fc12 -> gate_proj)."""
    out = {}
    for key, value in state.items():
        if key.startswith("embeddings."):
            out[key] = value
        elif key.startswith("emb_ln."):
            out["embeddings.LayerNorm." + key.split(".")[-1]] = value
        else:
            _, _, i, *rest = key.split(".")
            name = ".".join(rest)
            p = f"layers.{i}."
            if name == "attn.Wqkv.weight":
                q, k, v = value.chunk(3)
                out |= {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k}
                out[p + "self_attn.v_proj.weight"] = v
                continue
            renames = {
                "attn.out_proj": "self_attn.o_proj",
                "norm1": "post_attention_layernorm",
                "norm2": "post_mlp_layernorm",
                "mlp.fc11": "mlp.up_proj",
                "mlp.fc12": "mlp.gate_proj",
                "mlp.fc2": "mlp.down_proj",
            }
            module, kind = name.rsplit(".", 1)
            out[f"{p}{renames[module]}.{kind}"] = value
    return out


def transformers_config(config: dict) -> dict:
    """transformers' NomicBertConfig fields for a Nomic config.json."""
    factor = config["rotary_scaling_factor"]
    rope = {"rope_type": "default", "rope_theta": float(config["rotary_emb_base"])}
    if factor is not None:
        rope = {**rope, "rope_type": "dynamic", "factor": float(factor)}
    return {
        "model_type": "nomic_bert",
        "vocab_size": config["vocab_size"],
        "hidden_size": config["n_embd"],
        "num_hidden_layers": config["n_layer"],
        "num_attention_heads": config["n_head"],
        "intermediate_size": config["n_inner"],
        "hidden_act": "silu",
        "max_position_embeddings": config["max_trained_positions"],
        "layer_norm_eps": config["layer_norm_epsilon"],
        "type_vocab_size": 2,
        "rope_parameters": rope,
    }


def write_folder(
    folder: Path, config: dict, state: dict[str, torch.Tensor], prefix: str = "", head: bool = False
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stored = {prefix + k: v.contiguous() for k, v in state.items()}
    if head:  # what *ForPreTraining / *ForMaskedLM save beside the encoder
        stored["cls.predictions.transform.dense.weight"] = torch.zeros(4, 4)
    save_file(stored, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_folder() / name, folder / name)
    return folder


def reference_vectors(
    config: dict, state: dict, folder: Path, texts: list[str], dtype=torch.float64
) -> np.ndarray:
    """transformers' NomicBertModel, one text at a time (its dynamic NTK keeps the longest length seen,
    so each text gets a fresh model), mean over all tokens, L2-normalised; and the raw means."""
    from transformers import NomicBertConfig, NomicBertModel

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    hf_state = transformers_state(state)
    rows = []
    for text in texts:
        model = NomicBertModel(NomicBertConfig(**transformers_config(config)), add_pooling_layer=False)
        model.load_state_dict(hf_state, strict=True)
        model = model.to(dtype).eval()
        ids = torch.tensor([tokenizer.encode(text).ids])
        with torch.inference_mode():
            hidden = model(input_ids=ids).last_hidden_state[0]
        rows.append(hidden.double().mean(dim=0))
    return torch.stack(rows).numpy()


def l2(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, tuple[Path, Path, dict, dict]]:
    """heads -> (Nomic-layout folder, transformers-layout folder, Nomic config, Nomic-layout state)."""
    out = {}
    for heads, hidden in SHAPES:
        config = nomic_config(heads, hidden)
        state = random_state(config, seed=heads)
        nomic = write_folder(tmp_path_factory.mktemp(f"nomic-h{heads}"), config, state)
        hf = write_folder(
            tmp_path_factory.mktemp(f"hf-h{heads}"), transformers_config(config), transformers_state(state)
        )
        out[heads] = (nomic, hf, config, state)
    return out


@pytest.mark.parametrize(("heads", "hidden"), SHAPES)
def test_both_layouts_match_transformers(checkpoints, heads, hidden):
    nomic, hf, config, state = checkpoints[heads]
    reference = l2(reference_vectors(config, state, nomic, TEXTS))
    for folder in (nomic, hf):
        model = load_model(folder, device="cpu")
        assert (model.info.architecture, model.info.dim, model.info.pooling) == ("nomic_bert", hidden, "mean")
        ours = model.embed(TEXTS)
        assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), hidden)
        assert np.abs(ours - reference).max() <= 1e-5, folder
    assert load_model(nomic, device="cpu").info.max_tokens == 8192  # n_positions
    assert load_model(hf, device="cpu").info.max_tokens == 2048  # max_position_embeddings, no scaling


def test_reference_detects_plausible_mistakes(checkpoints):
    """The 1e-5 tolerance has teeth: a wrong rotary base or swapped GLU halves move vectors far more."""
    nomic, _, config, state = checkpoints[4]
    ours = load_model(nomic, device="cpu").embed(TEXTS)
    wrong_base = reference_vectors({**config, "rotary_emb_base": 10000}, state, nomic, TEXTS)
    swapped = dict(state)
    for i in range(config["n_layer"]):
        p = f"encoder.layers.{i}.mlp."
        swapped[p + "fc11.weight"], swapped[p + "fc12.weight"] = (
            state[p + "fc12.weight"],
            state[p + "fc11.weight"],
        )
    for wrong in (wrong_base, reference_vectors(config, swapped, nomic, TEXTS)):
        assert np.abs(ours - l2(wrong)).max() > 1e-3


@pytest.mark.parametrize("n_tokens", [16, 512, 2048])
def test_lengths_match_transformers(checkpoints, n_tokens):
    nomic, _, config, state = checkpoints[8]
    text = "word " * (n_tokens - 2)  # "word" is one token: [CLS] + n - 2 + [SEP]
    model = load_model(nomic, device="cpu")
    assert model.count_tokens([text]) == [n_tokens - 2]
    ours = model.embed([text, "short"])
    assert np.abs(ours - l2(reference_vectors(config, state, nomic, [text, "short"]))).max() <= 1e-5


def test_dynamic_ntk_in_packed_batches(tmp_path):
    """With rotary_scaling_factor set, a sequence longer than max_trained_positions rotates with a larger
    base, computed from its own length: packed beside short texts it equals itself alone and the
    reference; the short texts are unchanged by the long one."""
    config = nomic_config(4, 64, rotary_scaling_factor=2, max_trained_positions=64, n_positions=512)
    state = random_state(config, seed=7)
    folder = write_folder(tmp_path / "nomic-ntk", config, state)
    plain = write_folder(tmp_path / "nomic-plain", {**config, "rotary_scaling_factor": None}, state)
    texts = ["word " * 300, "a short one", "Rotary positions restart. " * 12, "word " * 62]
    model = load_model(folder, device="cpu")
    packed = model.embed(texts, batch_tokens=4096)
    alone = np.concatenate([model.embed([t]) for t in texts])
    assert np.abs(packed - alone).max() <= 1e-6
    assert np.abs(packed - l2(reference_vectors(config, state, folder, texts))).max() <= 1e-5
    unscaled = load_model(plain, device="cpu").embed(texts)
    lengths = [n + 2 for n in model.count_tokens(texts)]
    for row, n in enumerate(lengths):  # NTK moves exactly the sequences longer than 64 tokens
        moved = np.abs(packed[row] - unscaled[row]).max()
        assert (moved > 1e-3) if n > 64 else (moved == 0.0), (n, moved)
    assert ntk_base(model.module.config, 302, 16) == pytest.approx(1000 * (2 * 302 / 64 - 1) ** (16 / 14))


def test_8192_tokens_with_dynamic_ntk(tmp_path):
    config = nomic_config(2, 32, layers=1, inner=64, rotary_scaling_factor=2)
    state = random_state(config, seed=3)
    folder = write_folder(tmp_path / "nomic-8k", config, state)
    model = load_model(folder, device="cpu")
    text = "word " * 8190
    [[chunk]] = model.embed_chunks([text + "overflow " * 10], mode="full")
    assert chunk.truncated and chunk.n_tokens == 8190
    reference = l2(reference_vectors(config, state, folder, [text], dtype=torch.float32))
    assert np.abs(chunk.vector - reference[0]).max() <= 1e-5


def test_late_and_chunk_modes(checkpoints):
    nomic, _, config, state = checkpoints[4]
    model = load_model(nomic, device="cpu")
    text = "Late chunking pools token rows of one pass over the whole document. " * 20
    [chunks] = model.embed_chunks([text], mode="late", chunk_tokens=64, overlap=8)
    assert len(chunks) >= 4
    # Reference: one transformers pass over [CLS] text [SEP], each window's own rows pooled.
    from transformers import NomicBertConfig, NomicBertModel

    reference = NomicBertModel(NomicBertConfig(**transformers_config(config)), add_pooling_layer=False)
    reference.load_state_dict(transformers_state(state), strict=True)
    tokenizer = Tokenizer.from_file(str(nomic / "tokenizer.json"))
    tokenizer.no_truncation()
    ids = tokenizer.encode(text).ids
    with torch.inference_mode():
        hidden = reference.double().eval()(input_ids=torch.tensor([ids])).last_hidden_state[0]
    spans = windows(len(ids) - 2, 64, 8)
    assert len(spans) == len(chunks)
    for chunk, (a, b) in zip(chunks, spans, strict=True):
        rows = hidden[1 + a : 1 + b].mean(dim=0)  # row 0 is [CLS]
        assert chunk.n_tokens == b - a
        assert np.abs(chunk.vector - F.normalize(rows, dim=0).numpy()).max() <= 1e-5
    [pieces] = model.embed_chunks([text], mode="chunk", chunk_tokens=64, overlap=8)
    alone = model.embed([text[c.start : c.end] for c in pieces])
    assert np.abs(np.stack([c.vector for c in pieces]) - alone).max() <= 1e-5


# -- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prefix", "layout"), [("bert.", "nomic"), ("nomic_bert.", "transformers")])
def test_prefixed_checkpoints_with_heads(tmp_path, checkpoints, prefix, layout):
    """NomicBertForPreTraining saves `bert.` + `cls.*`; transformers' NomicBertForMaskedLM `nomic_bert.`."""
    nomic, _, config, state = checkpoints[4]
    if layout == "nomic":
        folder = write_folder(tmp_path, config, state, prefix=prefix, head=True)
    else:
        folder = write_folder(tmp_path, transformers_config(config), transformers_state(state), prefix, True)
    np.testing.assert_array_equal(
        load_model(folder, device="cpu").embed(TEXTS), load_model(nomic, device="cpu").embed(TEXTS)
    )


def expect_error(folder: Path, *needles: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(folder, device="cpu")
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_weights_are_named(tmp_path):
    config = nomic_config(4, 64)
    state = random_state(config, seed=1)
    missing = dict(state)
    del missing["encoder.layers.1.mlp.fc12.weight"]
    expect_error(
        write_folder(tmp_path / "a", config, missing), "1 weights missing", "encoder.layers.1.mlp.fc12"
    )
    misshapen = {**state, "encoder.layers.0.attn.Wqkv.weight": torch.zeros(64 * 3, 63)}
    expect_error(
        write_folder(tmp_path / "b", config, misshapen), "encoder.layers.0.attn.Wqkv.weight", "[192, 63]"
    )
    extra = {**state, "encoder.layers.0.attn.Wqkv.bias": torch.zeros(192)}
    expect_error(write_folder(tmp_path / "c", config, extra), "not used", "encoder.layers.0.attn.Wqkv.bias")
    hf = transformers_state(state)
    del hf["layers.0.self_attn.k_proj.weight"]
    expect_error(
        write_folder(tmp_path / "d", transformers_config(config), hf), "missing", "layers.0.self_attn.k_proj"
    )


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"qkv_proj_bias": True}, "qkv_proj_bias"),
        ({"prenorm": True}, "prenorm"),
        ({"rotary_emb_interleaved": True}, "rotary_emb_interleaved"),
        ({"rotary_emb_fraction": 0.5}, "rotary_emb_fraction"),
        ({"activation_function": "gelu"}, "activation_function"),
        ({"rotary_scaling_factor": -2}, "rotary_scaling_factor"),
        ({"n_head": 5}, "heads"),
    ],
)
def test_unsupported_variants_are_refused(tmp_path, changes, needle):
    config = nomic_config(4, 64)
    state = random_state(config, seed=1)
    expect_error(write_folder(tmp_path, {**config, **changes}, state), needle)


def test_reference_defaults_for_omitted_settings(tmp_path):
    """Nomic's config class defaults to biases and no rotary: a config.json that omits them is not ours."""
    config = nomic_config(4, 64)
    del config["mlp_fc1_bias"]
    expect_error(write_folder(tmp_path, config, random_state(config, seed=1)), "mlp_fc1_bias", "True")


# -- profile and Matryoshka ---------------------------------------------------------------------


def test_nomic_profiles(tmp_path):
    v15 = profile_for("nomic-ai/nomic-embed-text-v1.5", tmp_path)
    v1 = profile_for("nomic-ai/nomic-embed-text-v1", tmp_path)
    for profile in (v15, v1):
        assert profile.pooling == "mean"
        assert profile.prefixes == {"query": "search_query: ", "document": "search_document: "}
    assert v15.matryoshka_dims == (768, 512, 256, 128, 64)
    assert v1.matryoshka_dims == () and profile_for("BAAI/bge-small-en-v1.5", tmp_path).matryoshka_dims == ()


def test_truncate_dim_is_nomics_recipe():
    """Nomic's published v1.5 recipe on the mean-pooled output: F.layer_norm over the full width, keep the
    first d, F.normalize. Our vectors are already L2-normalised: the result must not change."""
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(5, 768, generator=g, dtype=torch.float64) * 3 + 0.5
    ours_in = F.normalize(pooled, dim=1).float().numpy()
    dims = (768, 512, 256, 128, 64)
    for dim in dims:
        expected = F.normalize(F.layer_norm(pooled, (768,))[:, :dim], dim=1).numpy()
        got = truncate_dim(ours_in, dim, dims)
        assert got.dtype == np.float32 and got.shape == (5, dim)
        assert np.abs(got - expected).max() <= 1e-6
        # Plain truncation (no centring) is a different vector: the recipe matters.
        assert np.abs(l2(ours_in[:, :dim]) - expected).max() > 1e-3
    with pytest.raises(ValueError, match="one of"):
        truncate_dim(ours_in, 300, dims)
    with pytest.raises(ValueError, match="not trained for Matryoshka"):
        truncate_dim(ours_in, 64, ())


def test_model_info_carries_matryoshka_dims(tmp_path, checkpoints):
    nomic, _, _, _ = checkpoints[4]
    folder = tmp_path / "nomic-embed-text-v1.5"
    shutil.copytree(nomic, folder)
    model = load_model(folder, device="cpu")
    assert model.info.matryoshka_dims == (768, 512, 256, 128, 64)
    assert model.info.prefixes["query"] == "search_query: "
    np.testing.assert_allclose(
        model.embed(["x"], kind="query"), model.embed(["search_query: x"], instruction=""), atol=1e-5
    )
    assert load_model(nomic, device="cpu").info.matryoshka_dims == ()


@pytest.mark.slow
def test_8192_tokens_run_on_cpu_with_bounded_memory(tmp_path):
    """As for JinaBERT: one full-context document in a fresh process; the rotary tables are (T, d/2)
    and attention never holds a (heads, n, n) matrix, so the peak stays far below 1 GiB."""
    import subprocess
    import sys
    import textwrap

    from tests.test_jina_bert import EMBED_8192, REPO

    config = nomic_config(4, 64, layers=1, rotary_scaling_factor=2)
    write_folder(tmp_path, config, random_state(config, seed=5))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EMBED_8192), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["n_tokens"] == 8190 and not result["truncated"]
    assert result["finite"] and abs(result["norm"] - 1.0) < 1e-5
    assert result["short_diff"] <= 1e-5
    assert result["extra_peak_mib"] < 1024, result


def test_bf16_runs_close_to_fp32(checkpoints):
    """bf16 weights and activations; rotary angles and rotation stay fp32 (positions up to 8191)."""
    nomic, _, _, _ = checkpoints[4]
    full = load_model(nomic, device="cpu").embed(TEXTS)
    half = load_model(nomic, device="cpu", dtype="bf16").embed(TEXTS)
    assert half.dtype == np.float32
    assert (full * half).sum(axis=1).min() > 0.99  # cosine similarity per text


def test_triton_kernels_in_the_interpreter_match_torch_and_reference(tmp_path, monkeypatch):
    """The GPU path on CPU: rotary, plain (alibi_slopes=None) varlen attention and pooling kernels run
    in Triton's interpreter (fp32), through the same dispatcher the encoder uses on CUDA."""
    pytest.importorskip("triton")
    config = nomic_config(2, 64, rotary_scaling_factor=2, max_trained_positions=32, n_positions=512)
    state = random_state(config, seed=11)
    folder = write_folder(tmp_path / "nomic-kernels", config, state)  # head_dim 32: a kernel size
    texts = ["", "a", "Rotary positions restart in every packed sequence. " * 6]
    model = load_model(folder, device="cpu")
    monkeypatch.setenv("LONGEMBED_KERNELS", "torch")
    with_torch = model.embed(texts)
    monkeypatch.setenv("LONGEMBED_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with_triton = model.embed(texts)
    assert np.abs(with_triton - with_torch).max() <= 1e-5
    assert np.abs(with_triton - l2(reference_vectors(config, state, folder, texts))).max() <= 1e-5
    monkeypatch.delenv("TRITON_INTERPRET")  # really routed through the kernels: they refuse CPU tensors
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        model.embed(["x"])
