"""Adapters, one folder per method (PEFT layout); importing this package registers them all."""

from shieldtune.adapters import full, lora, prefix, spf  # noqa: F401  (registration)
from shieldtune.adapters.base import ADAPTERS, Adapter, AdapterEntry, parse_config, register_adapter

__all__ = ["ADAPTERS", "Adapter", "AdapterEntry", "parse_config", "register_adapter"]
