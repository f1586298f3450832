"""Typed configuration of SPF (Sparsification Parameter Fine-tuning).

A YAML ``spf:`` section is only the serialised form of :class:`SPFConfig`; use
:meth:`SPFConfig.parse` to load one, so that every problem comes back as a single
:class:`~shieldtune.errors.ConfigError` naming the field, the bad value and the accepted values.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shieldtune.errors import ConfigError

__all__ = ["SPFConfig", "SaliencyRule", "SALIENCY_RULES"]

SaliencyRule = Literal["gradient", "magnitude", "random"]
SALIENCY_RULES: tuple[str, ...] = ("gradient", "magnitude", "random")


class SPFConfig(BaseModel):
    """Which weight entries SPF trains, and how they are chosen.

    The entries are chosen once, before training, by a saliency rule; afterwards only they change.
    Unknown keys are rejected.
    """

    model_config = ConfigDict(extra="forbid")

    density: float = Field(
        default=0.01,
        description="Fraction rho in (0, 1] of the target weight entries that train "
        "(global over all targets; k = max(1, round(rho * total))).",
    )
    saliency: SaliencyRule = Field(
        default="gradient",
        description="How entries are ranked: 'gradient' (sum of |grad| over warm-up batches), "
        "'magnitude' (|W|) or 'random' (uniform scores from a generator seeded with `seed`).",
    )
    warmup_batches: int = Field(
        default=4,
        description="Number of warm-up batches whose |grad| the 'gradient' rule sums (>= 1).",
    )
    target_modules: list[str] | None = Field(
        default=None,
        description="Patterns on parameter or module names (exact, '.'-suffix, or full-match "
        "regex). None: every 2-D weight of an nn.Linear or HF Conv1D module; embeddings and "
        "norms only when named.",
    )
    seed: int = Field(default=0, description="Seed of the 'random' rule's generator.")

    @field_validator("density")
    @classmethod
    def _density_in_range(cls, value: float) -> float:
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise ValueError("is outside (0, 1]; use e.g. 0.01 for 1 % of the entries")
        return value

    @field_validator("warmup_batches")
    @classmethod
    def _warmup_positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("is below 1; accepted: an integer >= 1")
        return value

    @field_validator("target_modules")
    @classmethod
    def _targets_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not p for p in value)):
            raise ValueError(
                "is empty or holds an empty pattern; "
                "give at least one non-empty pattern, or null for all linear weights"
            )
        return value

    @classmethod
    def parse(cls, data: dict[str, Any], section: str = "spf") -> SPFConfig:
        """Build a config from a plain mapping (e.g. a YAML section).

        Args:
            data: Field name -> value.
            section: Name of the section, used as the prefix in error messages.

        Returns:
            The validated config.

        Raises:
            ConfigError: One line per problem, e.g. ``spf.density: 1.5 is outside (0, 1]``.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{section}: expected a mapping of fields, got {data!r}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError([_describe(section, e) for e in err.errors()]) from None


def _describe(section: str, error: Any) -> str:
    """Turn one pydantic error into 'section.field: value problem'."""
    where = ".".join(str(part) for part in (section, *error["loc"]))
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        accepted = ", ".join(SPFConfig.model_fields)
        return f"{where}: unknown key; accepted keys: {accepted}"
    if kind == "literal_error":
        return f"{where}: {value!r} is not accepted; accepted: {', '.join(SALIENCY_RULES)}"
    if kind == "value_error":
        return f"{where}: {value!r} {error['msg'].removeprefix('Value error, ')}"
    return f"{where}: {value!r} is invalid ({error['msg']})"
