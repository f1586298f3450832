"""Tokenization for the two tasks: sequence classification and causal-LM instruction tuning.

Both encoders pad on the **right**: downstream code finds each row's last real token from the
attention mask. Tokenizers are any Hugging Face ``PreTrainedTokenizerBase`` (fast or slow).

Instruction tuning puts the loss on the answer only: ``labels`` is -100 on the prompt and on
padding, and equals ``input_ids`` on the answer tokens and the end-of-sequence token after
them (Hugging Face convention: the model shifts labels itself). The prompt is rendered with
the tokenizer's chat template when it has one (user turn = prompt, then the assistant turn
holds the answer) and as ``### Question: ... ### Answer:`` otherwise. Long inputs are
truncated inside the prompt (second text first, then the first text), never in the answer, and
always to leave room for the *longest* allowed answer, so a prompt (its length included) never
depends on its label and scoring sees exactly the prompts training saw.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from shieldtune.data.tables import Dataset, Example
from shieldtune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ANSWER_PROMPTS",
    "DEFAULT_TASK_PROMPT",
    "IGNORE_INDEX",
    "PAIR_SEPARATOR",
    "answer_token_ids",
    "batches",
    "encode_classification",
    "encode_instruction",
    "encode_prompt",
    "ensure_pad_token",
    "format_instruction",
    "instruction_prompts",
    "render_prompt",
    "task_prompt_for",
]

IGNORE_INDEX = -100
"""Label value the loss ignores (prompt and padding positions)."""

DEFAULT_TASK_PROMPT = "Classify the text. Options: {options}.\n\n{text}"
"""Task prompt for datasets without an entry in :data:`ANSWER_PROMPTS`."""

_MEDICAL_PROMPT = (
    "Which condition does this abstract describe? Options: {options}.\n\nAbstract: {text}"
)

ANSWER_PROMPTS: dict[str, str] = {
    "medical_abstracts": _MEDICAL_PROMPT,
    "medical_sample": _MEDICAL_PROMPT,
    "pubmedqa": "Context: {text_pair}\n\nQuestion: {text}\n\nAnswer yes, no or maybe.",
    "mqp": (
        "Do these two patient questions ask the same thing? Options: {options}.\n\n"
        "Question 1: {text}\nQuestion 2: {text_pair}"
    ),
}
"""Default task prompts of the built-in datasets, by dataset name.

Placeholders: ``{text}``, ``{text_pair}`` and ``{options}`` (the answer names joined with
commas). A text the template does not place is appended after it.
"""

PAIR_SEPARATOR = "\n"
"""Put between the two texts of a pair by :func:`encode_classification` when the tokenizer has
no sep token of its own."""

_PLACEHOLDER = re.compile(r"\{(text|text_pair|options)\}")


def _check_max_length(max_length: int, minimum: int = 2) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < minimum:
        raise ConfigError(f"max_length must be an integer >= {minimum}, got {max_length!r}")
    return max_length


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Make sure the tokenizer has a pad token, using its eos token if it has none.

    Sets ``tokenizer.pad_token`` when it was missing (decoder-only tokenizers often are).

    Args:
        tokenizer: The tokenizer (modified in place if it had no pad token).

    Returns:
        The pad token id.

    Raises:
        ConfigError: The tokenizer has neither a pad nor an eos token.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token; "
                "set tokenizer.pad_token before encoding"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.pad_token_id)


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for tid in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if tid is not None:
            return int(tid)
    raise ConfigError(
        f"tokenizer {type(tokenizer).__name__} has no eos (or sep) token to end the answer; "
        "set tokenizer.eos_token"
    )


def _right_pad(rows: Sequence[Sequence[int]], pad_value: int, length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), pad_value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _attention(rows: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        mask[i, : len(row)] = 1
    return mask


def encode_classification(
    ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenize a classification dataset into padded tensors.

    Rows are truncated to ``max_length`` tokens (for text pairs, the longer text is cut first)
    and padded on the right to the longest row. Pairs use the tokenizer's own pair template
    (``[CLS] a [SEP] b [SEP]`` for BERT); a tokenizer without a sep token (decoder LMs, which
    would run the texts together) gets :data:`PAIR_SEPARATOR` in front of the second text.
    A tokenizer without a pad token gets its eos token as pad (see :func:`ensure_pad_token`).

    Args:
        ds: The dataset (single texts, or pairs when its examples carry ``text_pair``).
        tokenizer: A Hugging Face tokenizer.
        max_length: Most tokens per row, special tokens included.

    Returns:
        ``input_ids`` and ``attention_mask`` (N, L), ``labels`` (N,), all int64, with
        L = min(max_length, longest row). For pair datasets whose tokenizer makes segment ids
        (BERT), ``token_type_ids`` (N, L) too.

    Raises:
        DataError: The dataset is empty, or mixes examples with and without a second text.
        ConfigError: ``max_length`` < 2, or the tokenizer has no pad and no eos token.
    """
    _check_max_length(max_length)
    if len(ds) == 0:
        raise DataError(f"dataset {ds.name!r} is empty; nothing to encode")
    pad_id = ensure_pad_token(tokenizer)
    texts = [ex.text for ex in ds.examples]
    has_pair = [ex.text_pair is not None for ex in ds.examples]
    if any(has_pair) and not all(has_pair):
        first = has_pair.index(False)
        raise DataError(
            f"dataset {ds.name!r} mixes single texts and text pairs "
            f"(example {first} has no text_pair)"
        )
    pairs = [ex.text_pair or "" for ex in ds.examples] if all(has_pair) else None
    if pairs is not None and tokenizer.sep_token is None:
        # decoder tokenizers join a pair with nothing in between: keep the texts apart
        pairs = [PAIR_SEPARATOR + p for p in pairs]
    enc = tokenizer(
        texts,
        pairs,
        truncation="longest_first" if pairs is not None else True,
        max_length=max_length,
        padding=False,
    )
    ids: list[list[int]] = [list(r) for r in enc["input_ids"]]
    length = max(len(r) for r in ids)
    out = {
        "input_ids": _right_pad(ids, pad_id, length),
        "attention_mask": _attention(ids, length),
        "labels": torch.tensor(ds.labels(), dtype=torch.long),
    }
    if pairs is not None and "token_type_ids" in enc:
        out["token_type_ids"] = _right_pad(enc["token_type_ids"], 0, length)
    return out


def _mix_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"shieldtune-batches:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def batches(
    encoded: dict[str, torch.Tensor],
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    *,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate over mini-batches of an encoded dataset.

    The order depends only on ``(seed, epoch)`` when shuffling (a local generator; global
    random state is neither read nor changed). Every tensor whose second dimension is the
    sequence length is trimmed to the batch's longest real row (from ``attention_mask``),
    which saves compute on right-padded data; 1-D tensors (class labels, prompt lengths)
    are only indexed.

    Args:
        encoded: Tensors sharing their first dimension N, e.g. from
            :func:`encode_classification` or :func:`encode_instruction`.
        batch_size: Rows per batch (>= 1); the last batch may be smaller.
        shuffle: Shuffle the rows.
        seed: Shuffle seed.
        epoch: Epoch number, mixed into the seed so each epoch has its own order.
        drop_last: Skip a final batch smaller than ``batch_size``.

    Returns:
        An iterator of dicts with the same keys as ``encoded`` (arguments are checked at the
        call, before the first batch).

    Raises:
        ConfigError: ``batch_size`` < 1, or the tensors disagree on N.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not encoded:
        return iter(())
    ref_key = "input_ids" if "input_ids" in encoded else next(iter(encoded))
    n = int(encoded[ref_key].shape[0])
    for key, value in encoded.items():
        if value.shape[0] != n:
            raise ConfigError(
                f"batches: tensor {key!r} has {value.shape[0]} rows but {ref_key!r} has {n}"
            )
    if shuffle:
        gen = torch.Generator().manual_seed(_mix_seed(seed, epoch))
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.arange(n)
    return _iter_batches(encoded, order, batch_size, drop_last)


def _iter_batches(
    encoded: dict[str, torch.Tensor], order: torch.Tensor, batch_size: int, drop_last: bool
) -> Iterator[dict[str, torch.Tensor]]:
    mask = encoded.get("attention_mask")
    seq_len = int(mask.shape[1]) if mask is not None and mask.dim() == 2 else None
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        width = None
        if seq_len is not None:
            real_cols = mask[idx].any(dim=0).nonzero()
            width = int(real_cols.max()) + 1 if len(real_cols) else 1
        batch = {}
        for key, value in encoded.items():
            value = value[idx]
            if width is not None and value.dim() >= 2 and value.shape[1] == seq_len:
                value = value[:, :width]
            batch[key] = value
        yield batch


# ------------------------------------------------------------------------------------------
# instruction tuning
# ------------------------------------------------------------------------------------------


def task_prompt_for(name: str) -> str:
    """Return the default task prompt of a dataset name.

    Args:
        name: A dataset name (e.g. ``Dataset.name``).

    Returns:
        ``ANSWER_PROMPTS[name]``, or :data:`DEFAULT_TASK_PROMPT` for other names.
    """
    return ANSWER_PROMPTS.get(name, DEFAULT_TASK_PROMPT)


def format_instruction(
    example: Example, label_names: Sequence[str], task_prompt: str
) -> tuple[str, str]:
    """Turn an example into a (prompt, answer) pair of strings.

    ``{text}``, ``{text_pair}`` and ``{options}`` in ``task_prompt`` are replaced by the
    example's texts and the comma-joined ``label_names``; a text the template does not place
    is appended after it, separated by a blank line.

    Args:
        example: The example.
        label_names: Answer string of each label; the answer is ``label_names[example.label]``.
        task_prompt: The instruction template, e.g. from :data:`ANSWER_PROMPTS`.

    Returns:
        ``(prompt_text, answer_text)``.

    Raises:
        DataError: The example's label has no answer name.
    """
    if not 0 <= example.label < len(label_names):
        raise DataError(
            f"label {example.label} has no answer name (answer names: {list(label_names)})"
        )
    values = {
        "text": example.text,
        "text_pair": example.text_pair or "",
        "options": ", ".join(label_names),
    }
    placed = set(_PLACEHOLDER.findall(task_prompt))
    prompt = _PLACEHOLDER.sub(lambda m: values[m.group(1)], task_prompt).strip()
    extra = [values["text"]] if "text" not in placed else []
    if example.text_pair is not None and "text_pair" not in placed:
        extra.append(values["text_pair"])
    if extra:
        prompt = "\n\n".join([prompt, *extra]) if prompt else "\n\n".join(extra)
    return prompt, str(label_names[example.label])


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt_text: str) -> str:
    """Render a prompt as the model sees it, up to where the answer starts.

    With a chat template: a single user turn plus the generation prompt (the opening of the
    assistant turn). Without: ``"### Question:\\n{prompt}\\n\\n### Answer:\\n"``.

    Args:
        tokenizer: The tokenizer.
        prompt_text: The prompt, e.g. from :func:`format_instruction`.

    Returns:
        The rendered text.
    """
    if _has_chat_template(tokenizer):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt_text}],
            tokenize=False,
            add_generation_prompt=True,
        )
        return str(rendered)
    return f"### Question:\n{prompt_text}\n\n### Answer:\n"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt_text: str) -> list[int]:
    """Token ids of a rendered prompt, exactly as :func:`encode_instruction` lays them out.

    Use it at inference time to generate or score answers after the same prompt. Chat
    templates bring their own special tokens; the plain format starts with the bos token
    when the tokenizer has one.

    Args:
        tokenizer: The tokenizer.
        prompt_text: The prompt text.

    Returns:
        The prompt's token ids.
    """
    return _encode_prompts(tokenizer, [prompt_text])[0]


def _encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    rendered = [render_prompt(tokenizer, p) for p in prompts]
    enc = tokenizer(rendered, add_special_tokens=False, verbose=False)["input_ids"]
    bos = tokenizer.bos_token_id
    prefix = [int(bos)] if not _has_chat_template(tokenizer) and bos is not None else []
    return [prefix + [int(t) for t in ids] for ids in enc]


def answer_token_ids(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """Token ids of an answer as it follows the prompt (without the closing eos).

    Args:
        tokenizer: The tokenizer.
        answer: The answer text (e.g. a label name).

    Returns:
        The ids; with :func:`encode_prompt` they give the full training sequence
        ``prompt + answer + [eos]``.

    Raises:
        DataError: The answer tokenizes to nothing.
    """
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if not ids:
        raise DataError(f"answer {answer!r} tokenizes to no tokens")
    return [int(i) for i in ids]


def _cut_tails(tokenizer: PreTrainedTokenizerBase, texts: list[str], drops: list[int]) -> list[str]:
    """Drop about ``drops[i]`` tokens from the end of ``texts[i]``, keeping the original text."""
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=fast, verbose=False)
    out = []
    for j, (text, drop) in enumerate(zip(texts, drops, strict=True)):
        drop = max(drop, 1)
        ids = enc["input_ids"][j]
        keep = len(ids) - drop
        if keep <= 0:
            out.append("")
            continue
        if fast:
            cut = text[: enc["offset_mapping"][j][keep - 1][1]]
        else:
            cut = tokenizer.decode(ids[:keep], skip_special_tokens=True)
        cut = cut.rstrip()
        if len(cut) >= len(text):  # never stall: always shorten
            cut = text[: max(len(text) - drop, 0)].rstrip()
        out.append(cut)
    return out


def _instruction_setup(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    task_prompt: str | None,
    answer_names: Sequence[str] | None,
) -> tuple[list[str], str, list[list[int]]]:
    """Check the arguments; return the answer names, the template and each answer's ids."""
    _check_max_length(max_length)
    if len(ds) == 0:
        raise DataError(f"dataset {ds.name!r} is empty; nothing to encode")
    names = list(answer_names) if answer_names is not None else list(ds.label_names)
    if len(names) != ds.num_labels:
        raise DataError(
            f"answer_names has {len(names)} names but dataset {ds.name!r} has "
            f"{ds.num_labels} labels ({ds.label_names})"
        )
    template = task_prompt if task_prompt is not None else task_prompt_for(ds.name)
    return names, template, [answer_token_ids(tokenizer, a) for a in names]


def _fit_prompts(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    template: str,
    names: list[str],
    reserve: int,
) -> list[list[int]]:
    """Prompt ids of every example, texts shortened until each prompt + ``reserve`` fits."""
    budget = max_length - reserve
    current = list(ds.examples)
    prompt_ids: list[list[int]] = [[] for _ in current]
    pending = list(range(len(current)))
    while pending:  # render, measure, shorten the texts of rows that do not fit; repeat
        encoded = _encode_prompts(
            tokenizer, [format_instruction(current[i], names, template)[0] for i in pending]
        )
        cuts: dict[str, list[tuple[int, int]]] = {"text_pair": [], "text": []}
        for i, ids in zip(pending, encoded, strict=True):
            excess = len(ids) - budget
            if excess <= 0:
                prompt_ids[i] = ids
            elif current[i].text_pair:
                cuts["text_pair"].append((i, excess))
            elif current[i].text:
                cuts["text"].append((i, excess))
            else:
                need = len(ids) + reserve
                raise ConfigError(
                    f"max_length={max_length} is too small for example {i} of {ds.name!r}: "
                    f"the instruction template alone takes {len(ids)} tokens and the longest "
                    f"answer with its eos {reserve}; use max_length >= {need}"
                )
        pending = []
        for field, items in cuts.items():
            if not items:
                continue
            texts = [getattr(current[i], field) for i, _ in items]
            shorter = _cut_tails(tokenizer, texts, [excess for _, excess in items])
            for (i, _), text in zip(items, shorter, strict=True):
                current[i] = dataclasses.replace(current[i], **{field: text})
                pending.append(i)
        pending.sort()
    return prompt_ids


def instruction_prompts(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    task_prompt: str | None = None,
    answer_names: Sequence[str] | None = None,
) -> list[list[int]]:
    """Prompt token ids of each example, exactly as :func:`encode_instruction` lays them out.

    A prompt never depends on the example's label: every prompt that must be shortened is
    shortened to leave room for the *longest* allowed answer plus the eos, whatever the
    example's own answer. (Shortening each prompt for its own answer would make the prompt's
    length, and so where the text is cut, a function of the label: a model learns to read the
    label off the cut instead of the text, and scoring candidates after one shared prompt
    then no longer sees what training saw.) So scoring or generating after these prompts sees
    exactly the ids training saw before the gold answer.

    Args:
        ds: The examples.
        tokenizer: The tokenizer.
        max_length: Most tokens of prompt + answer + eos.
        task_prompt: Instruction template; None for ``task_prompt_for(ds.name)``.
        answer_names: Answer string of each label; None for ``ds.label_names``.

    Returns:
        One list of prompt ids per example, in dataset order.

    Raises:
        DataError: The dataset is empty, or an answer name is missing or tokenizes to nothing.
        ConfigError: ``max_length`` cannot hold the instruction template plus the longest
            answer and its eos (the message says the minimum).
    """
    names, template, answers = _instruction_setup(
        ds, tokenizer, max_length, task_prompt, answer_names
    )
    _eos_id(tokenizer)  # the eos is part of the reserve: refuse a tokenizer without one here
    reserve = max(len(a) for a in answers) + 1
    return _fit_prompts(ds, tokenizer, max_length, template, names, reserve)


def encode_instruction(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    task_prompt: str | None = None,
    answer_names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize a dataset for causal-LM instruction tuning, with the loss on the answer only.

    Each row is ``prompt + answer_token_ids(answer) + [eos]``, right-padded with the pad token
    (eos if the tokenizer has none), where the prompt is :func:`instruction_prompts`'s: when a
    prompt would leave no room for the longest allowed answer + eos within ``max_length``, the
    example's second text is shortened first, then its first text, and the prompt is rendered
    again, so the instruction, the chat markup and the whole answer always fit, and the prompt
    (its length included) does not depend on the label.

    Args:
        ds: The dataset.
        tokenizer: A Hugging Face tokenizer (causal LM, ideally with a chat template).
        max_length: Most tokens per row.
        task_prompt: Instruction template (see :func:`format_instruction`); None for
            ``task_prompt_for(ds.name)``.
        answer_names: Answer string of each label; None for ``ds.label_names``.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (N, L) with labels -100 except on
        the answer tokens and the eos after them; ``prompt_lengths`` (N,) the number of
        prompt tokens of each row (where its answer starts); ``class_labels`` (N,) the class
        index of each row. All int64; L = the longest row.

    Raises:
        DataError: The dataset is empty, or an answer name is missing or tokenizes to nothing.
        ConfigError: ``max_length`` cannot hold the instruction template plus the longest
            answer (the message says the minimum), or the tokenizer has no eos/pad token.
    """
    names, template, answers = _instruction_setup(
        ds, tokenizer, max_length, task_prompt, answer_names
    )
    pad_id = ensure_pad_token(tokenizer)
    eos_id = _eos_id(tokenizer)
    reserve = max(len(a) for a in answers) + 1
    prompt_ids = _fit_prompts(ds, tokenizer, max_length, template, names, reserve)
    full_answers = [[*answers[ex.label], eos_id] for ex in ds.examples]

    rows = [p + a for p, a in zip(prompt_ids, full_answers, strict=True)]
    label_rows = [
        [IGNORE_INDEX] * len(p) + a for p, a in zip(prompt_ids, full_answers, strict=True)
    ]
    prompt_lengths = [len(p) for p in prompt_ids]

    length = max(len(r) for r in rows)
    return {
        "input_ids": _right_pad(rows, pad_id, length),
        "attention_mask": _attention(rows, length),
        "labels": _right_pad(label_rows, IGNORE_INDEX, length),
        "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.long),
        "class_labels": torch.tensor(ds.labels(), dtype=torch.long),
    }
