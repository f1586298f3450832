"""Run the attack suite: every attack against every mode's view, as rows of one table.

Each row is ``{attack, mode, cut, defence, metric, value, chance, n}``:

- ``metric``: ``token_recovery`` / ``rouge_l`` (inversion), ``auc`` / ``advantage``
  (membership), ``relative_error`` / ``cosine`` (adapter extraction; prefix extraction adds
  ``key_relative_error``, ``value_relative_error`` and ``attention_error``); ``value`` is what
  the attack scored;
- ``chance``: what an attacker scores without reading the view (see
  :mod:`shieldtune.attacks.metrics`): for inversion the larger of the oracle blind guess and the
  attack's outputs scored against another row's text, 0.5 for AUC, the shuffled-label mean for
  advantage; for extraction the public initial adapter's score (relative error 1.0, cosine 0),
  and relative-error rows (``attention_error`` too) also carry ``random_guess``, the score of a
  random guess of the right norm (and LoRA's rank);
- ``cut``: the split layer (None for membership and extraction); ``defence``: ``none`` or the
  DP setting;
  ``n``: scored token positions, candidate examples or attacked maps (prefix: layers);
  membership rows also carry ``repeats``, the noise draws or seals their value is the mean of;
  extraction rows ``rows`` (token rows the attack read) and ``adapted`` (adapted maps or
  prefixed layers, attacked or not).

:func:`leakage_vs_cut` runs the inversion attacks (:class:`InversionSuite`),
:func:`update_leakage` the membership attacks (:class:`MembershipSuite`),
:func:`extraction_leakage` the adapter extraction from Method 1's accelerator
(:class:`ExtractionSuite`), :func:`run_attacks` the first two.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

import torch
import torch.nn.functional as F

from shieldtune.attacks._shadow import Shadow
from shieldtune.attacks.base import ATTACKS, Surface
from shieldtune.attacks.capture import (
    accelerator_passes,
    accelerator_views,
    plain_split_view,
    sealed_update_record,
    sealed_update_view,
    split_records,
    split_view,
    victim_party,
)
from shieldtune.attacks.dp import privatize
from shieldtune.attacks.metrics import (
    advantage,
    blind_guess,
    cosine,
    mean_rouge_l,
    mismatched_rows,
    null_advantage,
    random_guess,
    random_low_rank_guess,
    relative_error,
    roc_auc,
    token_recovery,
)
from shieldtune.data.tables import Dataset
from shieldtune.data.tasks import batches as batches_of
from shieldtune.data.tasks import encode_classification
from shieldtune.errors import ConfigError
from shieldtune.federated.client_app import AdapterTrainer, LocalTraining
from shieldtune.models import ModelSlice, load_model, slice_model

__all__ = [
    "SPLIT_MODES",
    "FEDAVG_MODES",
    "EXTRACTION_MODES",
    "InversionSuite",
    "MembershipSuite",
    "ExtractionSuite",
    "leakage_vs_cut",
    "update_leakage",
    "extraction_leakage",
    "run_attacks",
]

Row = dict[str, Any]
SPLIT_MODES = ("plain-split", "split")
FEDAVG_MODES = ("plain-fedavg", "secure-fedavg")
EXTRACTION_MODES = ("plain-offload", "shielded")


@dataclass(frozen=True)
class InversionSuite:
    """Hidden-state inversion of split fine-tuning, per cut layer.

    Attributes:
        model: Preset or folder (seq-cls; the enclave loads the same).
        victim: The client's private data (its texts are what leaks).
        public: The attacker's public text (another dataset, or another split).
        cuts: Cut layers to measure.
        modes: Of :data:`SPLIT_MODES`.
        attacks: Registered ``cut-activations`` attacks.
        max_length: Tokens per row, special tokens included.
        batch_size: Rows per split step.
        seed: Run seed (model head, client random stream, attack training).
        wire_dtype: ``float32`` or ``bfloat16``.
        platform_key: Simulated platform secret (None: the default location).
    """

    model: str
    victim: Dataset
    public: Dataset
    cuts: Sequence[int]
    modes: Sequence[str] = SPLIT_MODES
    attacks: Sequence[str] = ("nn-inversion", "learned-inversion")
    max_length: int = 64
    batch_size: int = 8
    seed: int = 0
    wire_dtype: str = "float32"
    platform_key: Path | None = None


@dataclass(frozen=True)
class MembershipSuite:
    """Membership inference from one client's visible update.

    Attributes:
        settings: The client's local training (model, adapter, epochs, lr, seed).
        members: Encoded examples the client trains on.
        nonmembers: Encoded examples from the same distribution it never sees.
        modes: Of :data:`FEDAVG_MODES`.
        attacks: Registered ``update`` attacks.
        dp: ``(clip, sigma)`` settings of the DP option, each measured on ``plain-fedavg``.
        repeats: Independent noise draws (DP) or seals (secure-fedavg) per view; a row holds
            the mean of its metric over them.
        seed: Seed of the DP noise and of the advantage's chance level.
    """

    settings: LocalTraining
    members: dict[str, torch.Tensor]
    nonmembers: dict[str, torch.Tensor]
    modes: Sequence[str] = FEDAVG_MODES
    attacks: Sequence[str] = ("mia-loss", "mia-gradient")
    dp: Sequence[tuple[float, float]] = field(default_factory=tuple)
    repeats: int = 1
    seed: int = 0


def _check(names: Sequence[str], allowed: Sequence[str], what: str) -> None:
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ConfigError(f"{what}: unknown {bad}; accepted: {', '.join(allowed)}")


def _entries(names: Sequence[str], surface: Surface, field_name: str) -> list[Any]:
    entries = [ATTACKS.get(n, field=field_name) for n in names]
    wrong = [e.name for e in entries if e.surface != surface]
    if wrong:
        raise ConfigError(f"{field_name}: {wrong} do not read {surface!r}")
    return entries


# --------------------------------------------------------------------------- inversion
def _scored(batch: dict[str, torch.Tensor], special: torch.Tensor) -> torch.Tensor:
    """Real, non-special positions: what counts as recovered text."""
    return batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], special)


def _stack(parts: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Per-batch (B, T_b) tensors right-padded with 0 to (R, width), rows in batch order."""
    return torch.cat([F.pad(p, (0, width - p.shape[1])) for p in parts])


def _inversion_rows(
    name: str,
    mode: str,
    cut: int,
    preds: Sequence[torch.Tensor],
    victim: Sequence[dict[str, torch.Tensor]],
    special: torch.Tensor,
) -> list[Row]:
    width = max(b["input_ids"].shape[1] for b in victim)
    pred = _stack(preds, width)  # (R, W)
    target = _stack([b["input_ids"] for b in victim], width)  # (R, W)
    scored = _stack([_scored(b, special) for b in victim], width)  # (R, W)
    guess = torch.full_like(target, blind_guess(target, scored))  # (R, W)
    blind = token_recovery(guess, target, scored), mean_rouge_l(guess, target, scored)
    unrelated = mismatched_rows(pred, target, scored)
    base = {"attack": name, "mode": mode, "cut": cut, "defence": "none", "n": int(scored.sum())}
    recovery = token_recovery(pred, target, scored)
    rouge = mean_rouge_l(pred, target, scored)
    return [
        {
            **base,
            "metric": "token_recovery",
            "value": recovery,
            "chance": max(blind[0], unrelated[0]),
        },
        {**base, "metric": "rouge_l", "value": rouge, "chance": max(blind[1], unrelated[1])},
    ]


def _split_view(
    suite: InversionSuite,
    mode: str,
    front: ModelSlice,
    cut: int,
    victim: Sequence[dict[str, torch.Tensor]],
) -> list[torch.Tensor]:
    """The attacker's (B, T, d) reading of each victim batch in ``mode``."""
    if mode == "plain-split":
        return plain_split_view(front, victim, seed=suite.seed, wire_dtype=suite.wire_dtype)
    records = split_records(
        suite.model,
        front,
        victim,
        cut=cut,
        num_labels=suite.victim.num_labels,
        seed=suite.seed,
        wire_dtype=suite.wire_dtype,
        platform_key=suite.platform_key,
    )
    hidden_size = int(front.config.hidden_size)
    return [
        split_view(r, b, hidden_size, suite.wire_dtype)
        for r, b in zip(records, victim, strict=True)
    ]


def leakage_vs_cut(
    suite: InversionSuite, on_progress: Callable[[str], None] | None = None
) -> list[Row]:
    """Token recovery and ROUGE-L of each inversion attack, per cut and mode.

    Args:
        suite: What to measure.
        on_progress: Called with a short line as each (cut, mode) finishes.

    Returns:
        Rows (see the module docstring), two metrics per (cut, mode, attack).

    Raises:
        ConfigError: Unknown mode or attack, or an attack of another surface.
        ModelError: A cut outside the model's layers.
    """
    _check(suite.modes, SPLIT_MODES, "modes")
    entries = _entries(suite.attacks, "cut-activations", "attacks")
    loaded = load_model(suite.model, "seq-cls", suite.victim.num_labels, seed=suite.seed)
    tokenizer, model = loaded.tokenizer, loaded.model
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    victim = list(
        batches_of(
            encode_classification(suite.victim, tokenizer, suite.max_length),
            suite.batch_size,
            shuffle=False,
        )
    )
    public = encode_classification(suite.public, tokenizer, suite.max_length)
    rows: list[Row] = []
    for cut in suite.cuts:
        front, _ = slice_model(model, cut)
        for p in front.parameters():
            p.requires_grad_(False)
        views = {mode: _split_view(suite, mode, front, cut, victim) for mode in suite.modes}
        for entry in entries:
            attack = entry.build(front, public, seed=suite.seed)
            for mode, hidden in views.items():
                preds = [attack(h) for h in hidden]
                rows.extend(_inversion_rows(entry.name, mode, cut, preds, victim, special))
                if on_progress is not None:
                    on_progress(f"cut {cut} {entry.name} {mode}: {rows[-2]['value']:.3f}")
    return rows


# --------------------------------------------------------------------------- membership
def _membership_rows(
    name: str,
    mode: str,
    defence: str,
    scores: Sequence[torch.Tensor],
    is_member: torch.Tensor,
    seed: int,
) -> list[Row]:
    """AUC and advantage, each the mean over the repeated views' scores."""
    gen = torch.Generator().manual_seed(seed)
    base = {"attack": name, "mode": mode, "cut": None, "defence": defence}
    base |= {"n": is_member.numel(), "repeats": len(scores)}
    return [
        {
            **base,
            "metric": "auc",
            "value": mean(roc_auc(s, is_member) for s in scores),
            "chance": 0.5,
        },
        {
            **base,
            "metric": "advantage",
            "value": mean(advantage(s, is_member) for s in scores),
            "chance": mean(null_advantage(s, is_member, gen) for s in scores),
        },
    ]


def update_leakage(suite: MembershipSuite) -> list[Row]:
    """AUC and advantage of each membership attack against each view of one client's update.

    The client trains with its own code (one FedAvg round from the seeded adapter); the host's
    views are the update (``plain-fedavg``), the update with each DP setting, and the sealed
    ``submit`` record (``secure-fedavg``).

    Args:
        suite: What to measure.

    Returns:
        Rows (see the module docstring), two metrics per (attack, view).

    Raises:
        ConfigError: Unknown mode or attack, an attack of another surface, a bad DP setting, or
            ``repeats`` < 1.
    """
    _check(suite.modes, FEDAVG_MODES, "modes")
    entries = _entries(suite.attacks, "update", "attacks")
    if suite.repeats < 1:
        raise ConfigError(f"repeats: {suite.repeats!r} must be >= 1")
    client = AdapterTrainer(suite.settings, suite.members, suite.members, partition=0)
    start = client.state()
    update, n_train, _ = client.fit({}, {"server-round": 1})
    views: list[tuple[str, str, list[dict[str, torch.Tensor]]]] = []
    if "plain-fedavg" in suite.modes:
        views.append(("plain-fedavg", "none", [update]))
        gen = torch.Generator().manual_seed(suite.seed)
        for clip, sigma in suite.dp:
            noisy = [privatize(update, start, clip, sigma, gen) for _ in range(suite.repeats)]
            views.append(("plain-fedavg", f"dp(clip={clip:g}, sigma={sigma:g})", noisy))
    if "secure-fedavg" in suite.modes:
        sealed = [
            sealed_update_view(sealed_update_record(update, n_train), start)
            for _ in range(suite.repeats)
        ]
        views.append(("secure-fedavg", "none", sealed))
    shadow = Shadow(suite.settings)
    candidates = {k: torch.cat([suite.members[k], suite.nonmembers[k]]) for k in suite.members}
    is_member = torch.cat(
        [
            torch.ones(suite.members["input_ids"].shape[0], dtype=torch.bool),
            torch.zeros(suite.nonmembers["input_ids"].shape[0], dtype=torch.bool),
        ]
    )
    rows: list[Row] = []
    for entry in entries:
        scorer = entry.build(shadow, start, candidates)  # the host sent ``start``
        for mode, defence, states in views:
            scores = [scorer(state) for state in states]
            rows.extend(_membership_rows(entry.name, mode, defence, scores, is_member, suite.seed))
    return rows


def run_attacks(
    inversion: InversionSuite | None = None,
    membership: MembershipSuite | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Run the attack suite: inversion per cut layer, then membership inference.

    Args:
        inversion: Split-mode inversion settings, or None to skip.
        membership: Federated membership settings, or None to skip.
        on_progress: Progress lines of the inversion part.

    Returns:
        All rows, inversion first.
    """
    rows: list[Row] = []
    if inversion is not None:
        rows.extend(leakage_vs_cut(inversion, on_progress))
    if membership is not None:
        rows.extend(update_leakage(membership))
    return rows


# --------------------------------------------------------------------------- adapter extraction
@dataclass(frozen=True)
class ExtractionSuite:
    """Adapter extraction from what a Method 1 accelerator receives.

    Attributes:
        model: Preset or folder.
        adapter: The party's adapter settings (``method``; LoRA's targets, rank, alpha; a
            prefix's ``num_virtual_tokens``).
        train: The victim's batches (with labels), one step each, so its adapter is no longer
            the seeded one (LoRA: B ≠ 0); see :func:`~shieldtune.attacks.capture.victim_party`.
        evaluate: Batches whose evaluation forwards the accelerator then receives, per mode.
        holdout: Batches no view contains, for attacks that score the recovered adapter's
            effect on unseen tokens (``prefix-extraction``'s ``attention_error``).
        task: The party's task.
        num_labels: Its classes (seq-cls).
        modes: Of :data:`EXTRACTION_MODES`.
        attacks: Registered ``accelerator`` attacks that read the adapter's method
            (``lora-extraction``: LoRA; ``prefix-extraction``: P-tuning v2 prefixes).
        control: Also run each attack on random operands of the views' shapes.
        lr: The party's learning rate.
        w_bits: Bits of the integer weights.
        fused: The party's fused elementwise kernels (compiled on first use; same arithmetic).
        seed: The party's seed (adapter initialisation); also seeds the control and the guess.
        workdir: Where the worker saves operands, kept (None: a temporary folder).
    """

    model: str
    adapter: dict[str, Any]
    train: Sequence[dict[str, torch.Tensor]]
    evaluate: Sequence[dict[str, torch.Tensor]]
    holdout: Sequence[dict[str, torch.Tensor]] = ()
    task: str = "seq-cls"
    num_labels: int | None = 2
    modes: Sequence[str] = EXTRACTION_MODES
    attacks: Sequence[str] = ("lora-extraction",)
    control: bool = True
    lr: float = 1e-2
    w_bits: int = 12
    fused: bool = True
    seed: int = 0
    workdir: Path | None = None


def _extraction_rows(
    name: str, mode: str, est: dict, true: dict, base: Row, guess: float
) -> list[Row]:
    row = {"attack": name, "mode": mode, "cut": None, "defence": "none", **base}
    error = relative_error(est, true)
    return [
        {**row, "metric": "relative_error", "value": error, "chance": 1.0, "random_guess": guess},
        {**row, "metric": "cosine", "value": cosine(est, true), "chance": 0.0},
    ]


def extraction_leakage(
    suite: ExtractionSuite, on_progress: Callable[[str], None] | None = None
) -> list[Row]:
    """Relative error and cosine of each recovered adapter, per view of the accelerator.

    The party trains once; then its evaluation forwards go through one capturing worker, once
    per mode (the same adapter state under each), and each attack reads the captured operands
    (:func:`~shieldtune.attacks.capture.accelerator_passes`). The control (``random-operands``)
    feeds the attacks Gaussian operands of the same shapes.

    Args:
        suite: What to measure.
        on_progress: Called with a short line per (attack, view).

    Returns:
        Rows (see the module docstring), two metrics per (attack, view), then the attack's
        own, if it scores more (``scores``: ``prefix-extraction``'s per-part relative errors
        and ``attention_error``).

    Raises:
        ConfigError: Unknown mode or attack, an attack of another surface, or an adapter the
            attack cannot read.
    """
    _check(suite.modes, EXTRACTION_MODES, "modes")
    entries = _entries(suite.attacks, "accelerator", "attacks")
    options = {
        "task": suite.task,
        "num_labels": suite.num_labels,
        "seed": suite.seed,
        "w_bits": suite.w_bits,
    }
    attacks = [(e.name, e.build(suite.model, suite.adapter, **options)) for e in entries]
    say = on_progress or (lambda line: None)
    start = time.perf_counter()
    rows_per_use = max(b["input_ids"].numel() for b in [*suite.train, *suite.evaluate])
    party = victim_party(
        suite.model,
        suite.adapter,
        suite.train,
        lr=suite.lr,
        rows=rows_per_use,
        fused=suite.fused,
        **options,
    )
    say(f"victim trained {len(suite.train)} steps in {time.perf_counter() - start:.0f} s")
    state = party.adapter.state_dict()
    gen = torch.Generator().manual_seed(suite.seed)
    truths = [attack.deltas(state) for _, attack in attacks]
    guesses = [
        random_low_rank_guess(true, attack.rank, gen) if attack.rank else random_guess(true, gen)
        for (_, attack), true in zip(attacks, truths, strict=True)
    ]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        captured = accelerator_views(
            party, suite.evaluate, Path(suite.workdir or tmp) / "capture", suite.modes
        )
        views = {
            mode: [fp.operands for fp in accelerator_passes(records, party.field.p)]
            for mode, records in captured.items()
        }
    say(f"views {', '.join(views)} captured in {time.perf_counter() - start:.0f} s")
    if suite.control:
        shapes = next(iter(views.values()))
        views["random-operands"] = [
            {i: torch.randn(t.shape, generator=gen, dtype=torch.float64) for i, t in p.items()}
            for p in shapes
        ]
    masks = [b["attention_mask"] for b in suite.evaluate]  # the batch layout of each pass
    rows: list[Row] = []
    for mode, passes in views.items():
        for (name, attack), true, guess in zip(attacks, truths, guesses, strict=True):
            base = {
                "n": len(getattr(attack, "names", true)),
                "rows": sum(next(iter(p.values())).shape[0] for p in passes),
                "adapted": len(getattr(attack, "adapted", true)),
            }
            start = time.perf_counter()
            est = attack(passes, masks)
            seconds = time.perf_counter() - start
            error = relative_error(guess, true)
            rows.extend(_extraction_rows(name, mode, est, true, base, error))
            scores = getattr(attack, "scores", None)  # the attack's own metrics, if any
            if scores is not None:
                row = {"attack": name, "mode": mode, "cut": None, "defence": "none", **base}
                rows.extend({**row, **r} for r in scores(est, guess, state, suite.holdout))
            say(
                f"{name} {mode}: relative error {relative_error(est, true):.3f} "
                f"(attack {seconds:.0f} s)"
            )
    return rows
