"""Full fine-tuning (the insecure ceiling baseline): every weight of the slice trains."""

from shieldtune.adapters.base import register_adapter
from shieldtune.adapters.full.config import FullSettings
from shieldtune.adapters.full.model import FullAdapter, attach_full

__all__ = ["FullSettings", "FullAdapter", "attach_full"]

register_adapter(name="full", config_cls=FullSettings, attach=attach_full, prefix="")
