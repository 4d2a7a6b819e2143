"""What an encoder architecture tells the loader: one `Architecture` value per file in encoder/.

An architecture file (bert.py, jina_bert.py, nomic_bert.py) holds its config dataclass, its module and
its checkpoint key map, and ends with `ARCHITECTURE = Architecture(...)`; encoder/loading.py lists the
file's name in `ARCHITECTURE_MODULES`. The key map is written once: checkpoint key -> (our parameter
name, shape). It both names every missing, unused or misshapen weight and loads the module; several
checkpoint keys mapped to one parameter (separate Q, K and V into a fused QKV) are concatenated along
dim 0 in the map's order.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

Shape = tuple[int, ...]
KeyMap = dict[str, tuple[str, Shape]]


def _no_check(raw: dict, path: Path) -> None:
    return None


def _same_fields(raw: dict) -> dict:
    return raw


@dataclass(frozen=True)
class Architecture:
    name: str  # recorded as ModelInfo.architecture
    description: str  # for "unsupported model_type" messages: what users know it as
    model_type: str  # config.json's model_type
    config_class: type  # a frozen dataclass with at least vocab_size, hidden_size, max_position_embeddings
    module_class: Callable[[Any], nn.Module]  # module(config); forward(input_ids, position_ids, cu_seqlens,
    #                                           max_seqlen) -> (total_tokens, hidden)
    key_map: Callable[[Any, Collection[str]], KeyMap]  # (config, checkpoint keys) -> the map
    claims: Callable[[dict], bool] = lambda raw: True  # which configs of model_type are this architecture
    check: Callable[[dict, Path], None] = _no_check  # raise ModelLoadError for unsupported variants
    config_fields: Callable[[dict], dict] = _same_fields  # config.json -> config_class field values
    checkpoint_prefixes: tuple[str, ...] = ("bert.",)  # stripped: how *ForMaskedLM checkpoints nest keys


def linear(keys: KeyMap, src: str, dst: str, out: int, in_: int, bias: bool = True) -> None:
    """Map one Linear layer's checkpoint weights under `src` to ours under `dst`."""
    keys[f"{src}.weight"] = (f"{dst}.weight", (out, in_))
    if bias:
        keys[f"{src}.bias"] = (f"{dst}.bias", (out,))


def layer_norm(keys: KeyMap, src: str, dst: str, size: int) -> None:
    keys[f"{src}.weight"] = (f"{dst}.weight", (size,))
    keys[f"{src}.bias"] = (f"{dst}.bias", (size,))
