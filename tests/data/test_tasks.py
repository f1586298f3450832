"""Tokenization: classification tensors, batching, and answer-only instruction labels."""

from __future__ import annotations

import pytest
import torch

from shieldtune.data import (
    ANSWER_PROMPTS,
    IGNORE_INDEX,
    Dataset,
    Example,
    answer_token_ids,
    batches,
    encode_classification,
    encode_instruction,
    encode_prompt,
    format_instruction,
    generate_medical_sample,
    render_prompt,
    subset,
)
from shieldtune.errors import ConfigError, DataError

LONG = " ".join(["the cat and the dog"] * 200)  # 1,000 words


def _assert_right_padded(mask: torch.Tensor) -> None:
    lengths = mask.sum(dim=1)
    for row, n in zip(mask, lengths, strict=True):
        assert row[:n].eq(1).all() and row[n:].eq(0).all()


def _single() -> Dataset:
    return Dataset(
        examples=[
            Example("Chest pain at rest.", 1),
            Example(LONG, 0),
            Example("Fever.", 2),
        ],
        label_names=["a", "b", "c"],
        name="toy",
    )


def _pairs() -> Dataset:
    return Dataset(
        examples=[
            Example("Does it help?", 0, "Short context."),
            Example("Is the dog a cat?", 2, LONG),
        ],
        label_names=["yes", "no", "maybe"],
        name="pubmedqa",
    )


# ---------------------------------------------------------------- classification


def test_classification_right_pads_and_truncates(bert_tokenizer) -> None:
    enc = encode_classification(_single(), bert_tokenizer, max_length=32)

    assert set(enc) == {"input_ids", "attention_mask", "labels"}
    assert enc["input_ids"].shape == (3, 32) and enc["input_ids"].dtype == torch.long
    assert enc["labels"].tolist() == [1, 0, 2]
    _assert_right_padded(enc["attention_mask"])
    assert enc["attention_mask"].sum(dim=1)[1] == 32  # the long text was cut to max_length
    pad = bert_tokenizer.pad_token_id
    assert enc["input_ids"][2][enc["attention_mask"][2] == 0].eq(pad).all()
    assert enc["input_ids"][0, 0] == bert_tokenizer.cls_token_id


def test_classification_pads_only_to_the_longest_row(bert_tokenizer) -> None:
    ds = Dataset([Example("one two", 0), Example("one", 1)], ["x", "y"], "short")

    enc = encode_classification(ds, bert_tokenizer, max_length=64)

    assert enc["input_ids"].shape == (2, 4)  # [CLS] one two [SEP]


def test_classification_pairs_truncate_the_longer_text(bert_tokenizer) -> None:
    enc = encode_classification(_pairs(), bert_tokenizer, max_length=24)

    row = enc["input_ids"][1].tolist()
    assert len(row) == 24
    assert row.count(bert_tokenizer.sep_token_id) == 2  # both segments survive
    question = bert_tokenizer("Is the dog a cat?", add_special_tokens=False)["input_ids"]
    assert row[1 : 1 + len(question)] == question
    assert "token_type_ids" in enc and enc["token_type_ids"][1].max() == 1


def test_classification_uses_eos_when_no_pad(tiny_tokenizer) -> None:
    assert tiny_tokenizer.pad_token is None

    enc = encode_classification(_single(), tiny_tokenizer, max_length=8)

    assert tiny_tokenizer.pad_token == "<eos>"
    assert enc["input_ids"][2, -1] == tiny_tokenizer.eos_token_id
    _assert_right_padded(enc["attention_mask"])


def test_classification_rejects_empty_and_mixed(bert_tokenizer) -> None:
    mixed = Dataset([Example("a", 0, "b"), Example("c", 0)], ["x"], "mixed")

    with pytest.raises(DataError, match="is empty"):
        encode_classification(Dataset([], ["x"], "none"), bert_tokenizer, 16)
    with pytest.raises(DataError, match="mixes single texts and text pairs"):
        encode_classification(mixed, bert_tokenizer, 16)
    with pytest.raises(ConfigError, match="max_length"):
        encode_classification(_single(), bert_tokenizer, 0)


# ---------------------------------------------------------------- batches


def _toy_encoded(n: int = 10, width: int = 12) -> dict[str, torch.Tensor]:
    lengths = torch.arange(n) % 5 + 2
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {
        "input_ids": torch.arange(n * width).reshape(n, width) * mask,
        "attention_mask": mask,
        "labels": torch.arange(n),
    }


def test_batches_are_deterministic_and_cover_every_row() -> None:
    enc = _toy_encoded()

    first = [b["labels"].tolist() for b in batches(enc, 4, shuffle=True, seed=3, epoch=1)]
    again = [b["labels"].tolist() for b in batches(enc, 4, shuffle=True, seed=3, epoch=1)]
    other_epoch = [b["labels"].tolist() for b in batches(enc, 4, shuffle=True, seed=3, epoch=2)]

    assert first == again
    assert first != other_epoch
    assert sorted(i for b in first for i in b) == list(range(10))
    assert [len(b) for b in first] == [4, 4, 2]


def test_batches_trim_to_longest_real_row() -> None:
    enc = _toy_encoded()

    got = list(batches(enc, 3, shuffle=False))

    assert [b["labels"].tolist() for b in got][0] == [0, 1, 2]
    for b in got:
        longest = int(b["attention_mask"].sum(dim=1).max())
        assert b["input_ids"].shape[1] == longest == b["attention_mask"].shape[1]
        assert b["labels"].dim() == 1


def test_batches_drop_last_and_bad_size() -> None:
    enc = _toy_encoded()

    assert len(list(batches(enc, 4, shuffle=False, drop_last=True))) == 2
    with pytest.raises(ConfigError, match="batch_size"):
        batches(enc, 0, shuffle=False)
    with pytest.raises(ConfigError, match="'labels' has 3 rows"):
        batches({**enc, "labels": torch.arange(3)}, 2, shuffle=False)


# ---------------------------------------------------------------- instruction format


def test_format_instruction_placeholders_and_append() -> None:
    ex = Example("Is it?", 2, "Some context.")

    prompt, answer = format_instruction(ex, ["yes", "no", "maybe"], ANSWER_PROMPTS["pubmedqa"])
    appended, _ = format_instruction(Example("Text body.", 0), ["a", "b"], "Pick {options}.")

    assert answer == "maybe"
    assert prompt == "Context: Some context.\n\nQuestion: Is it?\n\nAnswer yes, no or maybe."
    assert appended == "Pick a, b.\n\nText body."
    with pytest.raises(DataError, match="no answer name"):
        format_instruction(Example("x", 3), ["a"], "{text}")


def test_medical_prompt_lists_the_options() -> None:
    ds = generate_medical_sample(n=5)

    prompt, answer = format_instruction(ds[0], ds.label_names, ANSWER_PROMPTS[ds.name])

    assert prompt.startswith("Which condition does this abstract describe? Options: neoplasms,")
    assert answer in ds.label_names and ds[0].text in prompt


# ---------------------------------------------------------------- instruction encoding


def _check_answer_only_labels(enc, tokenizer, ds, answer_names=None) -> None:
    names = answer_names or ds.label_names
    eos = tokenizer.eos_token_id
    for i, ex in enumerate(ds):
        n = int(enc["attention_mask"][i].sum())
        p = int(enc["prompt_lengths"][i])
        want = answer_token_ids(tokenizer, names[ex.label]) + [eos]
        labels = enc["labels"][i].tolist()
        ids = enc["input_ids"][i].tolist()
        assert labels[:p] == [IGNORE_INDEX] * p  # prompt
        assert labels[p:n] == want == ids[p:n]  # answer + eos
        assert labels[n:] == [IGNORE_INDEX] * (len(labels) - n)  # padding
        assert [t for t in labels if t != IGNORE_INDEX] == want


def test_instruction_labels_cover_only_the_answer(tiny_tokenizer) -> None:
    ds = _pairs()

    enc = encode_instruction(ds, tiny_tokenizer, max_length=64)

    assert set(enc) == {"input_ids", "attention_mask", "labels", "prompt_lengths", "class_labels"}
    _check_answer_only_labels(enc, tiny_tokenizer, ds)
    _assert_right_padded(enc["attention_mask"])
    assert enc["class_labels"].tolist() == [0, 2]
    p0 = int(enc["prompt_lengths"][0])
    assert enc["input_ids"][0, :p0].tolist() == encode_prompt(
        tiny_tokenizer, format_instruction(ds[0], ds.label_names, ANSWER_PROMPTS["pubmedqa"])[0]
    )
    assert render_prompt(tiny_tokenizer, "x").startswith("<|user|> x")


def test_long_prompt_is_cut_never_the_answer(tiny_tokenizer) -> None:
    ds = Dataset(
        [Example("which dog", 2, LONG), Example("which cat", 0, "a dog")],
        ["yes", "no", "maybe"],
        "toy_qa",
    )
    names = ["yes", "no", "maybe dog bird"]  # a three-token answer

    enc = encode_instruction(
        ds,
        tiny_tokenizer,
        40,
        task_prompt="context {text_pair} question {text}",
        answer_names=names,
    )

    assert enc["input_ids"].shape == (2, 40)
    assert int(enc["attention_mask"][0].sum()) == 40  # the long context filled the budget
    _check_answer_only_labels(enc, tiny_tokenizer, ds, names)
    # the context (second text) was shortened; the instruction and the question were kept
    prompt = tiny_tokenizer.decode(enc["input_ids"][0, : int(enc["prompt_lengths"][0])])
    assert prompt.startswith("<|user|> context the cat and the dog")
    assert prompt.endswith("question which dog <|assistant|>")
    assert tiny_tokenizer.decode(enc["input_ids"][0, 36:40]) == "maybe dog bird <eos>"


def test_single_text_is_cut_to_fit(tiny_tokenizer) -> None:
    ds = _single()

    enc = encode_instruction(ds, tiny_tokenizer, max_length=30, task_prompt="which {text}")

    assert enc["input_ids"].shape == (3, 30)
    _check_answer_only_labels(enc, tiny_tokenizer, ds)


def test_instruction_plain_format_without_chat_template(tiny_plain_tokenizer) -> None:
    ds = _single()

    enc = encode_instruction(ds, tiny_plain_tokenizer, max_length=24, task_prompt="{text}")

    assert enc["input_ids"][0, 0] == tiny_plain_tokenizer.bos_token_id
    assert render_prompt(tiny_plain_tokenizer, "hi") == "### Question:\nhi\n\n### Answer:\n"
    _check_answer_only_labels(enc, tiny_plain_tokenizer, ds)


def test_instruction_refuses_too_small_max_length(tiny_tokenizer) -> None:
    with pytest.raises(ConfigError, match=r"max_length=6 is too small.*use max_length >= "):
        encode_instruction(_pairs(), tiny_tokenizer, max_length=6, task_prompt="a b c d e {text}")
    with pytest.raises(DataError, match="answer_names has 2 names"):
        encode_instruction(_pairs(), tiny_tokenizer, 64, answer_names=["yes", "no"])


@pytest.mark.slow
def test_smollm2_chat_template_answer_only(smollm_tokenizer) -> None:
    tok = smollm_tokenizer
    ds = subset(generate_medical_sample(), range(6))
    long_pair = Dataset(
        [Example("Does exercise lower blood pressure?", 1, "Exercise was studied. " * 300)],
        ["yes", "no", "maybe"],
        "pubmedqa",
    )

    enc = encode_instruction(ds, tok, max_length=256)
    cut = encode_instruction(long_pair, tok, max_length=96)

    _check_answer_only_labels(enc, tok, ds)
    _check_answer_only_labels(cut, tok, long_pair)
    _assert_right_padded(enc["attention_mask"])
    assert tok.eos_token == "<|im_end|>"
    # the row is the chat rendering of the conversation (up to the template's closing newline)
    ex = ds[0]
    prompt, answer = format_instruction(ex, ds.label_names, ANSWER_PROMPTS[ds.name])
    full = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        tokenize=False,
    )
    n = int(enc["attention_mask"][0].sum())
    assert full.startswith(tok.decode(enc["input_ids"][0, :n]))
    # the long context was shortened; the question and the answer survived
    assert cut["input_ids"].shape[1] == 96
    text = tok.decode(cut["input_ids"][0, : int(cut["prompt_lengths"][0])])
    assert "Question: Does exercise lower blood pressure?" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_pair_classification_keeps_texts_apart(smollm_tokenizer) -> None:
    ds = Dataset([Example("Is it good?", 1, "It is bad.")], ["dissimilar", "similar"], "mqp")

    enc = encode_classification(ds, smollm_tokenizer, max_length=32)

    assert smollm_tokenizer.decode(enc["input_ids"][0]) == "Is it good?\nIt is bad."
