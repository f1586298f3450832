"""Causal-LM classification judged by the answer: score every allowed answer, or parse a generation.

Both evaluations run through any ``forward(input_ids, attention_mask) -> logits (B, T, V)`` on
right-padded batches, so the same code evaluates the local model (the full slice) and the split
path (``back(front(ids, mask), mask)``).

Prompts are :func:`~shieldtune.data.tasks.instruction_prompts`, the very ids
:func:`~shieldtune.data.tasks.encode_instruction` trains on: a prompt that must be shortened is
shortened to leave room for the longest allowed answer + eos whatever the label, so one prompt
per example serves every candidate, and the row scored for the gold answer is token for token
the training row (ids and answer labels).

* :func:`score_answers`: for each example and each allowed answer, the log-likelihood of the
  answer tokens plus eos given the prompt; the prediction is the answer with the highest sum
  (the mean-per-token variant is reported too).
* :func:`generate_answers`: greedy decoding without a KV cache (each new token re-runs the
  prefix; fine for a few tokens), then :func:`parse_answer`. A row stops as soon as
  :func:`answer_decided` says no continuation can change its parse (a base chat model that
  opens with "The abstract describes ..." is invalid after its first token), which gives the
  same predictions as decoding every ``max_new_tokens`` with far fewer forward passes.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from shieldtune.data.metrics import accuracy, macro_f1
from shieldtune.data.tables import Dataset
from shieldtune.data.tasks import (
    _eos_id,
    answer_token_ids,
    ensure_pad_token,
    instruction_prompts,
)
from shieldtune.errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "AnswerForward",
    "answer_decided",
    "answer_metrics",
    "answer_prompts",
    "generate_answers",
    "parse_answer",
    "score_answers",
]

AnswerForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``forward(input_ids (B, T), attention_mask (B, T)) -> logits (B, T, V)``, right padding."""

_PUNCT = string.punctuation
_LEADING = " \t\r\n\"'`*_"  # quotes and markdown emphasis a chat model may open its answer with


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def _answer_names(dataset: Dataset, answer_names: Sequence[str] | None) -> list[str]:
    names = list(answer_names) if answer_names is not None else list(dataset.label_names)
    if len(names) != dataset.num_labels:
        raise DataError(
            f"answer_names has {len(names)} names but dataset {dataset.name!r} has "
            f"{dataset.num_labels} labels ({dataset.label_names})"
        )
    if len(names) < 2:
        raise DataError(f"dataset {dataset.name!r} needs at least 2 answers to choose from")
    return names


def answer_prompts(
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    max_length: int,
    task_prompt: str | None = None,
    answer_names: Sequence[str] | None = None,
) -> list[list[int]]:
    """Prompt token ids of each example, with room for any allowed answer.

    Exactly the prompts :func:`~shieldtune.data.tasks.encode_instruction` trains on (see
    :func:`~shieldtune.data.tasks.instruction_prompts`): they do not depend on the labels.

    Args:
        tokenizer: The tokenizer.
        dataset: The examples (their labels are not used here).
        max_length: Most tokens of prompt + answer + eos.
        task_prompt: Instruction template; None for the dataset's default.
        answer_names: Answer string of each label; None for ``dataset.label_names``.

    Returns:
        One list of prompt ids per example, in dataset order.

    Raises:
        DataError: Empty dataset, wrong number of answer names, an answer with no tokens.
        ConfigError: ``max_length`` cannot hold the template plus the longest answer.
    """
    names = _answer_names(dataset, answer_names)
    return instruction_prompts(dataset, tokenizer, max_length, task_prompt, names)


def _check_logits(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ModelError(
            f"answer evaluation needs token logits (B, T, V) = ({ids.shape[0]}, {ids.shape[1]}, V) "
            f"from a causal LM, got shape {tuple(logits.shape)}"
        )
    return logits


def _padded(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def score_answers(
    forward: AnswerForward,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    max_length: int,
    batch_size: int,
    task_prompt: str | None = None,
    answer_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Classify each example by the log-likelihood of each allowed answer after its prompt.

    Every (example, answer) pair is one row ``prompt + answer + [eos]``; rows are sorted by
    length (less padding), right-padded and run ``batch_size`` at a time. The score of an
    answer is the sum of the log-probabilities of its tokens and the eos after them.

    Args:
        forward: ``forward(input_ids, attention_mask) -> (B, T, V)`` logits (eval mode is the
            caller's business).
        tokenizer: The tokenizer the prompts were trained with.
        dataset: Labelled examples.
        max_length: Most tokens per row (as in training).
        batch_size: Rows (candidates) per forward call.
        task_prompt: Instruction template; None for the dataset's default.
        answer_names: Answer string of each label; None for ``dataset.label_names``.

    Returns:
        ``accuracy`` and ``macro_f1`` of the argmax of the summed log-likelihood;
        ``mean_token_accuracy`` and ``mean_token_macro_f1`` of the argmax of the mean per
        token; ``per_class`` ({answer: {support, predicted, correct}}, sum variant);
        ``predictions`` / ``mean_token_predictions`` / ``labels`` (class indices, dataset
        order); ``log_likelihoods`` (N x K summed log-likelihoods); ``answer_tokens`` (tokens
        scored per answer, eos included); ``num_examples``.

    Raises:
        ConfigError: Bad ``batch_size`` / ``max_length``.
        DataError: Empty dataset, fewer than 2 answers, or an answer with no tokens.
        ModelError: ``forward`` does not return (B, T, V) logits.
    """
    _check_batch_size(batch_size)
    names = _answer_names(dataset, answer_names)
    prompts = answer_prompts(
        tokenizer, dataset, max_length=max_length, task_prompt=task_prompt, answer_names=names
    )
    pad_id, eos_id = ensure_pad_token(tokenizer), _eos_id(tokenizer)
    continuations = [[*answer_token_ids(tokenizer, a), eos_id] for a in names]
    n, k = len(prompts), len(names)

    cands = [(i, c) for i in range(n) for c in range(k)]  # example-major
    length = [len(prompts[i]) + len(continuations[c]) for i, c in cands]
    order = sorted(range(len(cands)), key=lambda r: -length[r])  # stable: ties stay together
    sums = torch.zeros(n, k, dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        chunk = [cands[r] for r in order[start : start + batch_size]]
        rows = [prompts[i] + continuations[c] for i, c in chunk]
        ids, mask = _padded(rows, max(len(r) for r in rows), pad_id)
        logits = _check_logits(forward(ids, mask), ids)  # (B, W, V)
        # the logit at position t predicts token t+1: answer token j sits at p+j, read at p+j-1
        row_idx, pos, target, ex_idx, ans_idx = [], [], [], [], []
        for b, (i, c) in enumerate(chunk):
            p, cont = len(prompts[i]), continuations[c]
            row_idx += [b] * len(cont)
            pos += range(p - 1, p - 1 + len(cont))
            target += cont
            ex_idx += [i] * len(cont)
            ans_idx += [c] * len(cont)
        picked = logits[torch.tensor(row_idx), torch.tensor(pos)].float()  # (M, V)
        logp = picked.log_softmax(-1).gather(1, torch.tensor(target)[:, None])[:, 0]  # (M,)
        sums.index_put_(
            (torch.tensor(ex_idx), torch.tensor(ans_idx)), logp.double(), accumulate=True
        )

    counts = torch.tensor([len(c) for c in continuations], dtype=torch.float64)
    preds = sums.argmax(1).tolist()
    mean_preds = (sums / counts).argmax(1).tolist()
    labels = dataset.labels()
    per_class = {
        name: {
            "support": sum(y == c for y in labels),
            "predicted": sum(p == c for p in preds),
            "correct": sum(p == y == c for p, y in zip(preds, labels, strict=True)),
        }
        for c, name in enumerate(names)
    }
    return {
        "accuracy": accuracy(preds, labels),
        "macro_f1": macro_f1(preds, labels, k),
        "mean_token_accuracy": accuracy(mean_preds, labels),
        "mean_token_macro_f1": macro_f1(mean_preds, labels, k),
        "per_class": per_class,
        "predictions": preds,
        "mean_token_predictions": mean_preds,
        "labels": labels,
        "log_likelihoods": sums.tolist(),
        "answer_tokens": [len(c) for c in continuations],
        "num_examples": n,
    }


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def parse_answer(text: str, answer_names: Sequence[str]) -> int | None:
    """The answer a generation gives, or None when it is not a valid answer.

    The generation is whitespace-normalised and lower-cased, and quotes / markdown emphasis
    it opens with are dropped. It is valid when it *starts* with an allowed answer name
    (case-insensitive, trailing punctuation of the name ignored) that ends at a word boundary
    (end of text, space or punctuation: ``"Neoplasms."`` and ``"neoplasms, because"`` are
    valid, ``"neoplasmsx"`` and ``"I think neoplasms"`` are not), and exactly one answer
    matches: a name that is a prefix of a longer matching name does not count on its own, two
    names that are equal once lower-cased make every match ambiguous.

    Args:
        text: The generated text (the new tokens only, decoded).
        answer_names: The allowed answers, in label order.

    Returns:
        The label index of the answer, or None.
    """
    gen = _normalise(text).lstrip(_LEADING)
    names = [_normalise(a).rstrip(_PUNCT + " ") for a in answer_names]
    hits = [
        c
        for c, name in enumerate(names)
        if name and gen.startswith(name) and (len(gen) == len(name) or not gen[len(name)].isalnum())
    ]
    longest = max((len(names[c]) for c in hits), default=0)
    hits = [c for c in hits if len(names[c]) == longest]
    return hits[0] if len(hits) == 1 else None


def answer_decided(text: str, answer_names: Sequence[str]) -> bool:
    """Whether no continuation of ``text`` can change what :func:`parse_answer` returns.

    After normalisation a longer generation only appends to the text, so the parse is fixed
    once the text is non-empty and no allowed answer still starts with it: each name is then
    either a proper prefix of the text (its boundary character is already there) or can never
    match. ``"neoplasms"`` is open (``"neoplasmsx"`` would be invalid), ``"neoplasms."`` and
    ``"the"`` are decided. A text that ends in a partly decoded character is open.

    Args:
        text: The generated text so far (decoded new tokens).
        answer_names: The allowed answers, in label order.

    Returns:
        True when ``parse_answer(text + more, answer_names)`` is the same for every ``more``.
    """
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: the next byte changes it
        return False
    gen = _normalise(text).lstrip(_LEADING)
    names = [_normalise(a).rstrip(_PUNCT + " ") for a in answer_names]
    return bool(gen) and not any(name.startswith(gen) for name in names)


@torch.no_grad()
def generate_answers(
    forward: AnswerForward,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    max_length: int,
    max_new_tokens: int = 8,
    batch_size: int,
    task_prompt: str | None = None,
    answer_names: Sequence[str] | None = None,
    num_shown: int = 5,
    stop_when_decided: bool = True,
) -> dict[str, Any]:
    """Greedy-decode an answer after each prompt and parse it with :func:`parse_answer`.

    No KV cache: each step re-runs the whole right-padded batch up to its longest row and
    appends each row's argmax token at that row's own end; a row stops at eos, and with
    ``stop_when_decided`` as soon as :func:`answer_decided` holds for its text. Rows are
    batched by prompt length (less padding); finished rows leave the batch.

    Args:
        forward: ``forward(input_ids, attention_mask) -> (B, T, V)`` logits.
        tokenizer: The tokenizer.
        dataset: Labelled examples.
        max_length: Prompt budget, as in :func:`score_answers` (the prompt leaves room for the
            longest answer + eos); generation may add ``max_new_tokens`` after it.
        max_new_tokens: Most tokens generated per example.
        batch_size: Rows per forward call.
        task_prompt: Instruction template; None for the dataset's default.
        answer_names: Answer string of each label; None for ``dataset.label_names``.
        num_shown: How many example generations to return.
        stop_when_decided: Stop a row once its parse cannot change (the same predictions and
            validity as decoding all ``max_new_tokens``; the text returned is then cut there).

    Returns:
        ``accuracy`` (invalid generations count as wrong), ``invalid_rate``, ``predictions``
        (label index, -1 when invalid), ``labels``, ``generations`` (decoded new tokens),
        ``examples`` (the first ``num_shown``: generation, label, prediction, valid) and
        ``num_examples``.

    Raises:
        ConfigError: Bad ``batch_size``, ``max_length`` or ``max_new_tokens``.
        DataError: Empty dataset or bad answer names.
        ModelError: ``forward`` does not return (B, T, V) logits.
    """
    _check_batch_size(batch_size)
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    names = _answer_names(dataset, answer_names)
    prompts = answer_prompts(
        tokenizer, dataset, max_length=max_length, task_prompt=task_prompt, answer_names=names
    )
    pad_id, eos_id = ensure_pad_token(tokenizer), _eos_id(tokenizer)
    new_tokens: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = _padded(
            [prompts[i] for i in chunk],
            max(len(prompts[i]) for i in chunk) + max_new_tokens,
            pad_id,
        )
        ends = mask.sum(1)  # (B,) next free position of each row
        active = torch.arange(len(chunk))
        for _ in range(max_new_tokens):
            width = int(ends[active].max())
            sub_ids, sub_mask = ids[active, :width], mask[active, :width]
            logits = _check_logits(forward(sub_ids, sub_mask), sub_ids)  # (b, width, V)
            nxt = logits[torch.arange(len(active)), ends[active] - 1].argmax(-1)  # (b,)
            grow = active[nxt != eos_id]
            tokens = nxt[nxt != eos_id]
            ids[grow, ends[grow]] = tokens
            mask[grow, ends[grow]] = 1
            ends[grow] += 1
            for b, t in zip(grow.tolist(), tokens.tolist(), strict=True):
                new_tokens[chunk[b]].append(t)
            if stop_when_decided:
                still_open = [
                    not answer_decided(
                        tokenizer.decode(new_tokens[chunk[b]], skip_special_tokens=True), names
                    )
                    for b in grow.tolist()
                ]
                grow = grow[torch.tensor(still_open, dtype=torch.bool)]
            active = grow
            if len(active) == 0:
                break

    generations = [tokenizer.decode(t, skip_special_tokens=True) for t in new_tokens]
    parsed = [parse_answer(g, names) for g in generations]
    preds = [-1 if p is None else p for p in parsed]
    labels = dataset.labels()
    shown = [
        {
            "generation": generations[i],
            "label": names[labels[i]],
            "prediction": None if parsed[i] is None else names[parsed[i]],
            "valid": parsed[i] is not None,
        }
        for i in range(min(num_shown, len(prompts)))
    ]
    return {
        "accuracy": sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels),
        "invalid_rate": sum(p is None for p in parsed) / len(parsed),
        "predictions": preds,
        "labels": labels,
        "generations": generations,
        "examples": shown,
        "num_examples": len(prompts),
    }


def answer_metrics(
    forward: AnswerForward,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    max_length: int,
    batch_size: int,
    generation: bool = False,
    max_new_tokens: int = 8,
) -> dict[str, float]:
    """The flat metrics a recipe logs: answer scoring, and optionally greedy generation.

    Returns:
        ``accuracy``, ``macro_f1`` and ``mean_token_accuracy`` from :func:`score_answers`;
        with ``generation``, ``gen_accuracy`` and ``gen_invalid_rate`` from
        :func:`generate_answers`.
    """
    scored = score_answers(
        forward, tokenizer, dataset, max_length=max_length, batch_size=batch_size
    )
    out = {
        "accuracy": scored["accuracy"],
        "macro_f1": scored["macro_f1"],
        "mean_token_accuracy": scored["mean_token_accuracy"],
    }
    if generation:
        gen = generate_answers(
            forward,
            tokenizer,
            dataset,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        out["gen_accuracy"] = gen["accuracy"]
        out["gen_invalid_rate"] = gen["invalid_rate"]
    return out
