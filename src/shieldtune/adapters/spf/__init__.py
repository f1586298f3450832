"""SPF: Sparsification Parameter Fine-tuning.

A sparse set of weight entries (density rho) is chosen once by a saliency rule and only those
entries train; the result is a sparse delta (indices + values) that, applied to a fresh copy of
the base model, reproduces the trained model bit for bit.
"""

from shieldtune.adapters.spf.config import SALIENCY_RULES, SaliencyRule, SPFConfig
from shieldtune.adapters.spf.layer import (
    SPF_PREFIX,
    SparseDeltaParametrization,
    add_sparse_delta,
    merge_sparse_delta,
    sparse_add,
)
from shieldtune.adapters.spf.model import (
    DELTA_FORMAT,
    DELTA_FORMAT_VERSION,
    DeltaEntry,
    SparseDelta,
    SPFModel,
    apply_delta,
    average_deltas,
)
from shieldtune.adapters.spf.saliency import score, select_targets, top_k_mask

__all__ = [
    "DELTA_FORMAT",
    "DELTA_FORMAT_VERSION",
    "SALIENCY_RULES",
    "SPF_PREFIX",
    "DeltaEntry",
    "SPFConfig",
    "SPFModel",
    "SaliencyRule",
    "SparseDelta",
    "SparseDeltaParametrization",
    "add_sparse_delta",
    "apply_delta",
    "average_deltas",
    "merge_sparse_delta",
    "score",
    "select_targets",
    "sparse_add",
    "top_k_mask",
]

from shieldtune.adapters.base import register_adapter  # noqa: E402
from shieldtune.adapters.spf.adapter import DELTA_FILE, SPFAdapter, attach_spf  # noqa: E402

__all__ += ["DELTA_FILE", "SPFAdapter", "attach_spf"]

register_adapter(name="spf", config_cls=SPFConfig, attach=attach_spf, prefix=SPF_PREFIX)
