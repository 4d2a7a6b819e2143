"""The loader refuses what it cannot run with a ModelLoadError that names the problem; profiles give each
model family its pooling and prefixes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from longembed.encoder import ModelLoadError, load_model
from longembed.encoder.loading import ARCHITECTURES
from longembed.encoder.profiles import BGE_QUERY, profile_for
from tests.jina_reference import jina_config, minilm_folder, write_checkpoint

MINILM_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
ORDINARY_TEXTS = [
    "how do I reset a password",
    "PostgreSQL stores vectors next to the text.",
    "café au lait, s'il vous plaît",
    "x",
    "Tokens are cut into windows with overlap; each window keeps its character span.",
]


@pytest.fixture
def jina(tmp_path) -> tuple[Path, dict, dict]:
    """A loadable tiny JinaBERT folder: (folder, config, state)."""
    folder = tmp_path / "jina-tiny"
    config = jina_config(4, 64)
    return folder, config, write_checkpoint(folder, config)


def minilm_copy(folder: Path, with_pooling: bool = False) -> Path:
    """The bundled MiniLM under another folder name, weights linked, no sentence-transformers files
    unless asked: the folder name alone decides the model family."""
    folder.mkdir(parents=True)
    source = minilm_folder()
    for name in MINILM_FILES:
        shutil.copy(source / name, folder / name)
    (folder / "model.safetensors").symlink_to(source / "model.safetensors")
    if with_pooling:
        shutil.copytree(source / "1_Pooling", folder / "1_Pooling")
    return folder


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def expect_error(folder_or_name, *needles: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(folder_or_name, device="cpu")
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


# -- files --------------------------------------------------------------------------------------


def test_tiny_jina_folder_loads(jina):
    folder, _, _ = jina
    model = load_model(folder, device="cpu")
    assert (model.info.architecture, model.info.dim) == ("jina_bert", 64)


def test_missing_config(jina):
    folder, _, _ = jina
    (folder / "config.json").unlink()
    expect_error(folder, "config.json is missing")


def test_missing_weights(jina):
    folder, _, _ = jina
    (folder / "model.safetensors").unlink()
    expect_error(folder, "no weights", "model.safetensors")


def test_missing_tokenizer(jina):
    folder, _, _ = jina
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.txt").unlink()
    expect_error(folder, "no tokenizer")


def test_vocab_txt_alone_is_enough(jina):
    folder, _, _ = jina
    before = load_model(folder, device="cpu").embed(ORDINARY_TEXTS)
    (folder / "tokenizer.json").unlink()
    np.testing.assert_array_equal(load_model(folder, device="cpu").embed(ORDINARY_TEXTS), before)


def test_pytorch_bin_weights_load_like_safetensors(jina):
    folder, _, state = jina
    before = load_model(folder, device="cpu").embed(ORDINARY_TEXTS)
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    np.testing.assert_array_equal(load_model(folder, device="cpu").embed(ORDINARY_TEXTS), before)


def test_corrupt_safetensors(jina):
    folder, _, _ = jina
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    expect_error(folder, "cannot read weights", "model.safetensors")


def test_truncated_safetensors(jina):
    folder, _, _ = jina
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_error(folder, "cannot read weights")


def test_corrupt_pytorch_bin(jina):
    folder, _, _ = jina
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle at all" * 10)
    expect_error(folder, "cannot read weights", "pytorch_model.bin")


def test_corrupt_tokenizer_json(jina):
    folder, _, _ = jina
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    expect_error(folder, "tokenizer.json")


def test_invalid_tokenizer_config(jina):
    folder, _, _ = jina
    (folder / "tokenizer_config.json").write_text("{not json")
    expect_error(folder, "tokenizer_config.json")


def test_tokenizer_without_cls_token(jina):
    folder, _, _ = jina
    edit_json(folder / "tokenizer_config.json", cls_token="<s>")
    expect_error(folder, "cls_token", "<s>")


def test_tokenizer_larger_than_the_embedding_table(tmp_path):
    """MiniLM's tokenizer has 30522 ids: a model with fewer rows would fail on rare words at embed time."""
    config = jina_config(4, 64, vocab_size=30000)
    write_checkpoint(tmp_path, config)
    expect_error(tmp_path, "30522", "30000")


# -- weights ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("encoder.layer.1.attention.self.query.weight", (65, 64)),
        ("encoder.layer.0.attention.self.key.weight", (64, 65)),
        ("encoder.layer.0.mlp.gated_layers.weight", (128, 64)),
        ("embeddings.word_embeddings.weight", (30528, 32)),
        ("encoder.layer.1.mlp.layernorm.bias", (63,)),
    ],
)
def test_wrong_shape_names_the_weight(tmp_path, key, shape):
    config = jina_config(4, 64)
    state = write_checkpoint(tmp_path / "ok", config)
    state[key] = torch.zeros(shape)
    write_checkpoint(tmp_path / "bad", config, state=state)
    expect_error(tmp_path / "bad", key, str(list(shape)))


def test_missing_keys_are_named(tmp_path):
    config = jina_config(4, 64)
    state = write_checkpoint(tmp_path / "ok", config)
    del state["encoder.layer.1.mlp.wo.bias"]
    write_checkpoint(tmp_path / "bad", config, state=state)
    expect_error(tmp_path / "bad", "1 weights missing", "encoder.layer.1.mlp.wo.bias")


def test_a_layer_too_few_is_missing_keys(tmp_path):
    config = jina_config(4, 64, num_hidden_layers=3)
    write_checkpoint(tmp_path, config, state=write_checkpoint(tmp_path / "two", jina_config(4, 64)))
    expect_error(tmp_path, "weights missing", "encoder.layer.2.")


def test_unknown_keys_are_named(tmp_path):
    config = jina_config(4, 64)
    state = write_checkpoint(tmp_path / "ok", config)
    state["encoder.layer.0.attention.self.rotary.inv_freq"] = torch.ones(8)
    write_checkpoint(tmp_path / "bad", config, state=state)
    expect_error(tmp_path / "bad", "not used", "encoder.layer.0.attention.self.rotary.inv_freq")


# -- config.json --------------------------------------------------------------------------------


def test_unknown_model_type(jina):
    folder, _, _ = jina
    edit_json(folder / "config.json", model_type="xlm-roberta")
    expect_error(folder, "model_type", "xlm-roberta")


def test_missing_model_type(jina):
    folder, config, _ = jina
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    expect_error(folder, "model_type")


def test_unsupported_position_embedding_type(tmp_path):
    folder = minilm_copy(tmp_path / "minilm")
    edit_json(folder / "config.json", position_embedding_type="relative_key_query")
    expect_error(folder, "position_embedding_type", "relative_key_query")


def test_unsupported_feed_forward_type(jina):
    folder, _, _ = jina
    edit_json(folder / "config.json", feed_forward_type="reglu")
    expect_error(folder, "feed_forward_type", "reglu")


def test_invalid_json_config(jina):
    folder, _, _ = jina
    (folder / "config.json").write_text('{"model_type": "bert",')
    expect_error(folder, "config.json", "not valid JSON")


def test_config_not_utf8(jina):
    folder, _, _ = jina
    (folder / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    expect_error(folder, "config.json")


@pytest.mark.parametrize("content", ["[]", '"bert"', "null", "42"])
def test_config_not_an_object(jina, content):
    folder, _, _ = jina
    (folder / "config.json").write_text(content)
    expect_error(folder, "config.json")


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"num_attention_heads": 5}, "heads"),  # 64 does not divide into 5 heads
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"num_attention_heads": -4}, "num_attention_heads"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers"),
        ({"hidden_act": "swish-ish"}, "swish-ish"),
    ],
)
def test_invalid_config_values(jina, changes, needle):
    folder, _, _ = jina
    edit_json(folder / "config.json", **changes)
    expect_error(folder, needle)


# -- where the model comes from -----------------------------------------------------------------


def test_hub_id_while_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    expect_error("longembed-tests/no-such-model", "longembed-tests/no-such-model", "HF_HUB_OFFLINE")
    assert time.monotonic() - start < 5


def test_path_to_a_file(jina):
    folder, _, _ = jina
    expect_error(folder / "config.json", "is a file")


def test_missing_local_path(tmp_path):
    expect_error(tmp_path / "nowhere" / "model", "no model folder")


def test_max_tokens_out_of_range(jina):
    folder, _, _ = jina
    for bad in (2, 8193):
        with pytest.raises(ModelLoadError, match="max_tokens"):
            load_model(folder, device="cpu", max_tokens=bad)


# -- profiles and prefixes ----------------------------------------------------------------------


def test_bge_folder_gets_cls_pooling_and_query_prefix(tmp_path):
    from tokenizers import Tokenizer
    from transformers import BertModel

    folder = minilm_copy(tmp_path / "bge-small-en-v1.5")
    model = load_model(folder, device="cpu")
    assert model.info.pooling == "cls"
    assert model.info.prefixes == {"query": BGE_QUERY, "document": ""}

    # Reference: transformers' BERT on the same folder, [CLS] row, L2-normalised.
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    reference_model = BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()

    def reference(texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            ids = torch.tensor([tokenizer.encode(text).ids])
            with torch.inference_mode():
                cls = reference_model(input_ids=ids).last_hidden_state[0, 0]
            rows.append(torch.nn.functional.normalize(cls, dim=-1).numpy())
        return np.stack(rows)

    documents = model.embed(ORDINARY_TEXTS)
    queries = model.embed(ORDINARY_TEXTS, kind="query")
    assert np.abs(documents - reference(ORDINARY_TEXTS)).max() <= 1e-5
    assert np.abs(queries - reference([BGE_QUERY + t for t in ORDINARY_TEXTS])).max() <= 1e-5
    assert np.abs(queries - documents).max() > 1e-2
    with pytest.raises(ValueError, match="late chunking needs mean pooling"):
        model.embed_chunks(ORDINARY_TEXTS, mode="late")


def test_e5_folder_gets_query_and_passage_prefixes(tmp_path):
    folder = minilm_copy(tmp_path / "e5-small-v2", with_pooling=True)
    model = load_model(folder, device="cpu")
    assert model.info.prefixes == {"query": "query: ", "document": "passage: "}
    assert model.info.pooling == "mean"
    np.testing.assert_allclose(
        model.embed(ORDINARY_TEXTS, kind="query"),
        model.embed(ORDINARY_TEXTS, instruction="query: "),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        model.embed(ORDINARY_TEXTS),
        model.embed(ORDINARY_TEXTS, kind="query", instruction="passage: "),
        atol=1e-6,
    )
    # Chunks get the prefix too; their spans are in the text alone.
    text = " ".join(ORDINARY_TEXTS * 4)
    [chunks] = model.embed_chunks([text], mode="chunk", chunk_tokens=24, overlap=4, kind="query")
    assert len(chunks) >= 3
    alone = model.embed([text[c.start : c.end] for c in chunks], kind="query")
    assert np.abs(np.stack([c.vector for c in chunks]) - alone).max() <= 1e-5
    # An explicit empty instruction means no prefix at all, whatever the profile says.
    plain = load_model(minilm_folder(), device="cpu").embed(ORDINARY_TEXTS)
    np.testing.assert_allclose(model.embed(ORDINARY_TEXTS, kind="query", instruction=""), plain, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "pooling", "query", "document"),
    [
        ("BAAI/bge-base-en-v1.5", "cls", BGE_QUERY, ""),
        ("intfloat/multilingual-e5-large", "mean", "query: ", "passage: "),
        ("nomic-ai/nomic-embed-text-v1.5", "mean", "search_query: ", "search_document: "),
        ("jinaai/jina-embeddings-v2-base-en", "mean", "", ""),
        ("sentence-transformers/all-MiniLM-L6-v2", "mean", "", ""),
        ("some-org/unknown-model", "mean", "", ""),
        ("my-bge-lookalike", "mean", "", ""),  # names must start the family, not contain it
    ],
)
def test_profiles_by_name(tmp_path, name, pooling, query, document):
    profile = profile_for(name, tmp_path)
    assert (profile.pooling, profile.prefixes) == (pooling, {"query": query, "document": document})


def test_sentence_transformers_prompts_win(tmp_path):
    folder = minilm_copy(tmp_path / "e5-base")
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "Q: ", "passage": "P: "}, "default_prompt_name": None})
    )
    model = load_model(folder, device="cpu")
    assert model.info.prefixes == {"query": "Q: ", "document": "P: "}
    np.testing.assert_allclose(
        model.embed(ORDINARY_TEXTS, kind="query"),
        model.embed(["Q: " + t for t in ORDINARY_TEXTS], instruction=""),
        atol=1e-5,
    )


def test_unsupported_pooling_in_folder(tmp_path):
    folder = minilm_copy(tmp_path / "minilm", with_pooling=True)
    edit_json(
        folder / "1_Pooling" / "config.json", pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True
    )
    expect_error(folder, "pooling_mode_max_tokens")


def test_invalid_sentence_transformers_files(tmp_path):
    folder = minilm_copy(tmp_path / "minilm", with_pooling=True)
    (folder / "config_sentence_transformers.json").write_text('{"prompts": ["query: "]}')
    expect_error(folder, "config_sentence_transformers.json")
    (folder / "config_sentence_transformers.json").write_text('{"prompts": {"query": null}}')
    expect_error(folder, "config_sentence_transformers.json", "query")
    (folder / "config_sentence_transformers.json").write_text("{")
    expect_error(folder, "config_sentence_transformers.json")
    (folder / "config_sentence_transformers.json").unlink()
    (folder / "1_Pooling" / "config.json").write_text("{")
    expect_error(folder, "1_Pooling")


def test_instruction_equals_prefixed_text_on_minilm():
    """Prefix and text are tokenised apart and their ids joined: for ordinary texts that is the same
    as tokenising the joined string."""
    model = load_model(device="cpu")
    for instruction in ("query: ", "Represent this sentence for searching relevant passages: "):
        joined = model.embed([instruction + t for t in ORDINARY_TEXTS])
        apart = model.embed(ORDINARY_TEXTS, instruction=instruction)
        assert np.abs(joined - apart).max() <= 1e-5
        assert np.abs(apart - model.embed(ORDINARY_TEXTS)).max() > 1e-2


def test_bad_kind_and_instruction(jina):
    folder, _, _ = jina
    model = load_model(folder, device="cpu")
    with pytest.raises(ValueError, match="kind"):
        model.embed(["x"], kind="passage")
    with pytest.raises(TypeError, match="instruction"):
        model.embed(["x"], instruction=b"query: ")


def test_pytorch_bin_that_is_not_a_state_dict(jina):
    folder, _, _ = jina
    (folder / "model.safetensors").unlink()
    torch.save([torch.zeros(3)], folder / "pytorch_model.bin")
    expect_error(folder, "pytorch_model.bin", "not a state dict")


@pytest.mark.parametrize("length", ["abc", -5, 2, True])
def test_invalid_max_seq_length(tmp_path, length):
    folder = minilm_copy(tmp_path / "minilm")
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": length}))
    expect_error(folder, "max_seq_length", repr(length))


def test_hub_cache_snapshot_folder_is_named_by_its_repo(tmp_path):
    """A path into the Hugging Face cache ends in a commit hash; the family is in the folder above."""
    snapshot = (
        tmp_path
        / "hub"
        / "models--BAAI--bge-small-en-v1.5"
        / "snapshots"
        / "5c38ec7c405ec4b44b94cc5a9bb96e735b38267a"
    )
    model = load_model(minilm_copy(snapshot), device="cpu")
    assert model.info.name == "BAAI/bge-small-en-v1.5"
    assert (model.info.pooling, model.info.prefixes["query"]) == ("cls", BGE_QUERY)


# -- the architecture registry ------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda a: a.name)
def test_each_key_map_fills_its_module_exactly(architecture):
    """The key map is the only list of an architecture's weights: every parameter of the module gets
    exactly one tensor of its shape (fused ones from their parts), nothing else."""
    config = architecture.config_class(
        vocab_size=100, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96
    )
    keys = architecture.key_map(config, set())
    module = architecture.module_class(config)
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    built: dict[str, list[tuple[int, ...]]] = {}
    for ours, shape in keys.values():
        built.setdefault(ours, []).append(shape)
    assert built.keys() == expected.keys()
    for name, shapes in built.items():
        fused = (sum(s[0] for s in shapes), *shapes[0][1:])
        assert fused == expected[name], name


def test_registry_names_every_model_type_in_its_refusal(jina):
    folder, _, _ = jina
    edit_json(folder / "config.json", model_type="xlm-roberta")
    message = expect_error(folder, "xlm-roberta")
    for architecture in ARCHITECTURES:
        assert architecture.description in message and repr(architecture.model_type) in message
