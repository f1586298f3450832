"""Models: presets, family layouts and layer slicing. No security code lives here."""

from shieldtune.models.families import FAMILIES, Family, KVGeometry, TaskKind, family_of, task_of
from shieldtune.models.presets import PRESETS, TINY_CONFIGS, LoadedModel, load_model, minilm_folder
from shieldtune.models.slicing import ModelSlice, PrefixProvider, full_slice, slice_model, unwrap

__all__ = [
    "FAMILIES",
    "Family",
    "KVGeometry",
    "TaskKind",
    "family_of",
    "task_of",
    "PRESETS",
    "TINY_CONFIGS",
    "LoadedModel",
    "load_model",
    "minilm_folder",
    "ModelSlice",
    "PrefixProvider",
    "full_slice",
    "slice_model",
    "unwrap",
]
