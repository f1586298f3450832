"""P-tuning v2 (deep prefix tuning): trainable per-layer key/value prefixes."""

from shieldtune.adapters.base import register_adapter
from shieldtune.adapters.prefix.config import PrefixSettings
from shieldtune.adapters.prefix.model import PrefixAdapter, attach_prefix

__all__ = ["PrefixSettings", "PrefixAdapter", "attach_prefix"]

register_adapter(name="prefix", config_cls=PrefixSettings, attach=attach_prefix, prefix="prefix.")
