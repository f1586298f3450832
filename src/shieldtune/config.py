"""Run configuration: typed, validated once at the edge; YAML is only its serialised form.

Unknown keys are refused, every problem is reported in one :class:`ConfigError` that names the
field, the bad value and what is accepted. Adapter options are flat next to ``method`` and are
validated by that method's own settings class, found through the closed adapter registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shieldtune.errors import ConfigError

__all__ = [
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "SplitConfig",
    "FederatedConfig",
    "ShieldedConfig",
    "RunConfig",
    "load_config",
    "apply_overrides",
    "to_yaml",
    "adapter_settings",
]

Mode = Literal[
    "local", "plain-split", "split", "plain-fedavg", "secure-fedavg", "shielded", "shielded-fedavg"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which model, for which task."""

    name: str = Field("minilm", description="preset (minilm, smollm2, tiny-*) or a local folder")
    task: Literal["seq-cls", "causal-lm"] = Field("seq-cls", description="task head")


class DataConfig(_Strict):
    """Which data, how it is split and tokenised."""

    dataset: str = Field("medical_abstracts", description="built-in dataset or 'table'")
    data_dir: str | None = Field(
        None, description="folder of the built-in sets (default ../shared/data)"
    )
    path: str | None = Field(None, description="CSV/JSONL file when dataset is 'table'")
    text: str | None = Field(None, description="text column of the table")
    text_pair: str | None = Field(None, description="second text column of a pair task")
    label: str | None = Field(None, description="label column of the table")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share")
    split_seed: int = Field(0, ge=0, description="seed of the train/test split")
    max_length: int = Field(128, ge=8, le=8192, description="max tokens per example")
    max_train_examples: int | None = Field(None, ge=1, description="cap on training rows")
    max_test_examples: int | None = Field(None, ge=1, description="cap on test rows")


class TrainConfig(_Strict):
    """Optimisation budget."""

    epochs: int = Field(3, ge=1, description="passes over the training split")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps")
    batch_size: int = Field(16, ge=1, description="examples per step")
    eval_batch_size: int = Field(64, ge=1, description="examples per evaluation batch")
    lr: float = Field(5e-4, gt=0, description="AdamW learning rate")
    front_lr: float | None = Field(
        None, gt=0, description="learning rate of the front slice (split)"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    schedule: Literal["constant", "linear"] = Field(
        "linear", description="learning rate: constant, or linear warm-up then decay to 0"
    )
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="share of steps spent warming up")
    grad_clip: float | None = Field(1.0, gt=0, description="gradient-norm clip")
    seed: int = Field(0, ge=0, description="seed of initialisation, shuffling and dropout")
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="bfloat16 autocast is an option; it is slow on AVX2-only CPUs"
    )
    log_every: int = Field(10, ge=1, description="steps between metric lines")
    eval_generation: bool = Field(
        False,
        description="causal-lm: also evaluate greedy generations (gen_accuracy, gen_invalid_rate)",
    )
    zero_shot: bool = Field(
        False,
        description="local: evaluate the base model before training (epoch 0, zero_shot_*)",
    )


class SplitConfig(_Strict):
    """Where the model is cut, what trains on each side, and how many clients (split modes)."""

    cut: int = Field(2, ge=0, description="layers run by the front slice")
    front_adapter: dict[str, Any] | None = Field(
        None, description="front-slice adapter, e.g. {method: spf, density: 0.01}; None = frozen"
    )
    wire_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="split: dtype of the hidden states and gradients on the wire"
    )
    allow_simulated: bool = Field(
        False,
        description="split: accept a SIMULATED server enclave (no hardware protection); "
        "development and testing only",
    )
    clients: int = Field(
        1,
        ge=1,
        le=64,
        description="split clients, each with its own share of the training split (partitioned "
        "by federated.partition / alpha / partition_seed). Above 1 the run is federated on "
        "Flower: federated.rounds, local_epochs, min_clients, round_timeout_s and workers set "
        "the schedule (federated.num_clients, train.epochs and train.max_steps are not used)",
    )
    server_adapter: Literal["shared", "per_client"] = Field(
        "shared",
        description="clients > 1: one server-side adapter updated by every client's steps "
        "(shared), or one per client session, averaged by examples after each round "
        "(per_client)",
    )
    dp_clip: float | None = Field(
        None,
        gt=0,
        description="clients > 1: clip each client's SPF delta update to this L2 norm before "
        "averaging (DP; inside the server's aggregation enclave in split). None: no DP",
    )
    dp_sigma: float = Field(
        0.0,
        ge=0,
        description="clients > 1: DP noise multiplier σ: N(0, (σ·dp_clip·largest weight "
        "share)²) is added on the union support of the deltas (the indices are not covered)",
    )

    @model_validator(mode="after")
    def _multi_client_options(self) -> SplitConfig:
        problems = []
        if self.dp_sigma > 0 and self.dp_clip is None:
            problems.append(
                f"split.dp_sigma is {self.dp_sigma} but split.dp_clip is not set: DP noise needs "
                "a clipping bound; set split.dp_clip (e.g. 1.0) or split.dp_sigma to 0"
            )
        if self.clients == 1:
            if self.server_adapter != "shared":
                problems.append(
                    "split.server_adapter: 'per_client' needs split.clients > 1 (with one "
                    "client its adapter is the shared one); set split.clients or use 'shared'"
                )
            if self.dp_clip is not None or self.dp_sigma > 0:
                problems.append(
                    "split.dp_clip / split.dp_sigma: DP applies to the averaged SPF deltas of "
                    "split.clients > 1; set split.clients above 1 or remove them"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class FederatedConfig(_Strict):
    """Federated rounds on Flower (plain-fedavg, secure-fedavg, shielded-fedavg)."""

    num_clients: int = Field(3, ge=1, le=1000, description="client nodes (one data partition each)")
    rounds: int = Field(3, ge=1, description="federated rounds")
    local_epochs: int = Field(1, ge=1, description="passes over its partition per round")
    partition: Literal["iid", "dirichlet"] = Field("iid", description="how training rows split")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (non-IID label skew)")
    partition_seed: int = Field(0, ge=0, description="seed of the client partition")
    min_clients: int = Field(2, ge=1, description="fewest accepted updates a round needs")
    fraction: float = Field(1.0, gt=0, le=1, description="share of clients sampled per round")
    round_timeout_s: float = Field(600.0, gt=0, description="wait for replies, then drop")
    max_update_mb: float = Field(64.0, gt=0, description="largest update accepted from a client")
    backend: str = Field("simulated", description="server enclave backend (secure-fedavg)")
    allow_simulated: bool = Field(
        False, description="secure-fedavg: accept a SIMULATED enclave (no hardware protection)"
    )
    enclave_memory_mb: float = Field(256.0, gt=0, description="server enclave memory budget")
    workers: int = Field(1, ge=1, description="client messages handled at once (simulation)")
    eval_confusion: bool = Field(
        True,
        description="clients send their test share's confusion matrix (per-class counts, in the "
        "clear, like the other metrics) so that macro-F1 is the whole test split's; false: "
        "macro-F1 is the sample-weighted mean of the clients' (not the whole split's)",
    )

    @model_validator(mode="after")
    def _quorum_fits(self) -> FederatedConfig:
        if self.min_clients > self.num_clients:
            raise ValueError(
                f"min_clients ({self.min_clients}) exceeds num_clients ({self.num_clients})"
            )
        return self


class ShieldedConfig(_Strict):
    """Method 1: the adapter in the party's TEE, frozen maps on an untrusted accelerator."""

    offload: bool = Field(
        True, description="offload the frozen linear maps (false: TEE-only baseline)"
    )
    w_bits: int = Field(12, ge=2, le=16, description="bits of the per-channel integer weights")
    field_bits: int = Field(
        0, ge=0, le=61, description="bits of the prime p (0: largest exact in one float64 GEMM)"
    )
    max_bits: int = Field(
        0, ge=0, le=60, description="cap on the encoded operands' bits (0: what the field allows)"
    )
    check_rate: float = Field(1.0, ge=0, le=1, description="share of products Freivalds-checked")
    fused: bool = Field(
        True,
        description="fuse the encode+mask and unmask+decode passes with torch.compile (same "
        "arithmetic; eager where it cannot compile)",
    )
    pool_size: int = Field(1, ge=0, le=64, description="ready unmasking factors per stream")
    refill: Literal["after-step", "idle"] = Field(
        "after-step",
        description="when the pool is topped up: after every step, or only between epochs "
        "(misses are made on the spot)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="the accelerator's device")
    gemm: str = Field("auto", description="exact GEMM backend of the accelerator (auto: probe)")
    backend: str = Field("simulated", description="the party's enclave backend")
    allow_simulated: bool = Field(
        False, description="accept a SIMULATED enclave (no hardware protection); testing only"
    )
    enclave_memory_mb: float = Field(4096.0, gt=0, description="enclave memory budget")
    capture: int = Field(
        0, ge=0, description="operands the accelerator saves to the run folder (attacks)"
    )


class RunConfig(_Strict):
    """One training run."""

    mode: Mode = Field(
        "local",
        description="local | plain-split | split | plain-fedavg | secure-fedavg | shielded | "
        "shielded-fedavg",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    adapter: dict[str, Any] = Field(
        default_factory=lambda: {"method": "lora"},
        description="adapter of the trained (back) slice: {method: lora|prefix|full, ...options}",
    )
    split: SplitConfig = Field(default_factory=SplitConfig)
    federated: FederatedConfig = Field(default_factory=FederatedConfig)
    shielded: ShieldedConfig = Field(default_factory=ShieldedConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str = Field("runs", description="parent folder of run folders")
    run_name: str | None = Field(None, description="run folder name (default: mode-model-time)")

    @field_validator("adapter")
    @classmethod
    def _has_method(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "method" not in value:
            raise ValueError("needs a 'method' key (lora, prefix, full)")
        return value


def adapter_settings(spec: dict[str, Any], where: str) -> tuple[str, Any]:
    """Resolve ``{method: name, **options}`` through the adapter registry and validate options.

    Returns:
        ``(method, settings)`` with settings an instance of the method's config class.

    Raises:
        ConfigError: Unknown method (lists the registered ones) or invalid options.
    """
    from shieldtune.adapters import ADAPTERS, parse_config

    options = dict(spec)
    method = options.pop("method", None)
    entry = ADAPTERS.get(str(method), field=f"{where}.method")
    return entry.name, parse_config(entry.config_cls, options, where)


def _problems(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
        lines.append(f"{field}: {e['msg']}{got}")
    return lines


def validate(data: dict[str, Any]) -> RunConfig:
    """Validate a plain dict into a :class:`RunConfig`, adapters included.

    Raises:
        ConfigError: Every problem found, one per line.
    """
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_problems(err)) from None
    problems: list[str] = []
    specs = [("adapter", cfg.adapter)]
    if cfg.mode in ("plain-split", "split") and cfg.split.front_adapter is not None:
        specs.append(("split.front_adapter", cfg.split.front_adapter))
    if cfg.mode in ("plain-split", "split") and cfg.split.clients > 1:
        problems.extend(_multi_split_problems(cfg))
    for where, spec in specs:
        try:
            adapter_settings(spec, where)
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _multi_split_problems(cfg: RunConfig) -> list[str]:
    """Cross-section checks of a split run with several clients."""
    s, f = cfg.split, cfg.federated
    problems = []
    if f.min_clients > s.clients:
        problems.append(
            f"federated.min_clients ({f.min_clients}) exceeds split.clients ({s.clients}); "
            "a round could never complete"
        )
    front = (s.front_adapter or {}).get("method", "spf")
    if front != "spf":
        problems.append(
            f"split.front_adapter.method: {front!r} cannot be averaged across split clients; "
            "accepted with split.clients > 1: spf (or no front adapter)"
        )
    return problems


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML scalars) to a config dict.

    Raises:
        ConfigError: An override is not of the form ``key.path=value``.
    """
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.path=value, e.g. train.epochs=1")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: Missing/unreadable file, bad YAML, or invalid fields.
    """
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {file} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {file} must hold a mapping at the top level")
    data.setdefault("adapter", {"method": "lora"})  # so `adapter.rank=4` overrides the default
    return validate(apply_overrides(data, overrides or []))


def to_yaml(cfg: RunConfig) -> str:
    """Serialise a config (the resolved form written to every run folder)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
