"""Answer evaluation of causal LMs: log-likelihood scoring, greedy generation, parsing, wiring."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from shieldtune.config import load_config
from shieldtune.data.builtin import load_builtin
from shieldtune.data.splits import subset
from shieldtune.data.tables import Dataset
from shieldtune.data.tasks import IGNORE_INDEX, answer_token_ids, encode_instruction
from shieldtune.errors import ModelError
from shieldtune.models import full_slice, load_model, slice_model
from shieldtune.recipes import run_local, run_plain_split
from shieldtune.training import task_loss
from shieldtune.training.answers import (
    answer_decided,
    answer_prompts,
    generate_answers,
    parse_answer,
    score_answers,
)

# the sample's prompts take at most ~300 byte tokens: 400 leaves room for any answer, no truncation
ROOMY = 400
# a budget that cuts every sample text: the template takes ~36 byte tokens, the longest answer
# ("general pathological conditions") 31 + eos, which leaves ~28 bytes of text
TIGHT = 96
# a short template for the tests that run the model (byte tokens are many; CPU time is scarce)
SHORT = "Which condition? {text}"
NAMES = load_builtin("medical_sample").label_names


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-llama", "causal-lm")
    loaded.model.eval()
    return loaded


@pytest.fixture(scope="module")
def sample() -> Dataset:
    """Five medical_sample rows, texts shortened (byte tokens are many) to different lengths."""
    ds = subset(load_builtin("medical_sample"), range(5))
    short = [dataclasses.replace(ex, text=ex.text[: 30 + 17 * i]) for i, ex in enumerate(ds)]
    return Dataset(short, ds.label_names, ds.name)


def _brute_force(model, tokenizer, ds: Dataset, c: int) -> list[float]:
    """Log-likelihood of answer c for each example: one unpadded ``model(...)`` call per row.

    The row and its loss mask come from ``encode_instruction`` with every label set to c
    (at ROOMY nothing is truncated, so the prompt is the one score_answers uses).
    """
    relabelled = Dataset([dataclasses.replace(ex, label=c) for ex in ds], ds.label_names, ds.name)
    enc = encode_instruction(relabelled, tokenizer, ROOMY, SHORT)
    out = []
    for i in range(len(ds)):
        n = int(enc["attention_mask"][i].sum())
        ids, labels = enc["input_ids"][i : i + 1, :n], enc["labels"][i, :n]
        logits = model(input_ids=ids).logits[0]  # (n, V)
        ce = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
        out.append(-float(ce))
    return out


def test_log_likelihoods_equal_independent_cross_entropies_and_argmax(tiny, sample):
    # Prepare
    model, tok = tiny.model, tiny.tokenizer
    with torch.no_grad():
        expected = torch.tensor([_brute_force(model, tok, sample, c) for c in range(5)]).T.double()
    # Execute: batch of 7 candidate rows, so batches mix examples and lengths
    got = score_answers(
        full_slice(model), tok, sample, max_length=ROOMY, batch_size=7, task_prompt=SHORT
    )
    # Assert
    scores = torch.tensor(got["log_likelihoods"], dtype=torch.float64)
    torch.testing.assert_close(scores, expected, atol=1e-3, rtol=1e-5)
    assert got["predictions"] == expected.argmax(1).tolist()
    counts = torch.tensor([len(answer_token_ids(tok, a)) + 1 for a in NAMES])
    assert got["answer_tokens"] == counts.tolist()
    assert got["mean_token_predictions"] == (expected / counts).argmax(1).tolist()
    labels = sample.labels()
    assert got["labels"] == labels
    hits = sum(p == y for p, y in zip(got["predictions"], labels, strict=True))
    assert got["accuracy"] == hits / 5
    assert sum(v["support"] for v in got["per_class"].values()) == 5
    assert sum(v["predicted"] for v in got["per_class"].values()) == 5


def _teacher_forward(answer: str, tokenizer, boost: float = 30.0):
    """A hand-built LM that dictates ``answer + eos`` after any prompt, whatever came before.

    The byte tokenizer's chat template ends a prompt with ``<s>assistant\n``; from there on the
    logit of the next token of ``answer + eos`` is ``boost`` (all others 0), so that answer is
    by far the most likely continuation and greedy decoding writes it out exactly.
    """
    script = answer_token_ids(tokenizer, answer) + [tokenizer.eos_token_id]
    opener = len(answer_token_ids(tokenizer, "assistant\n"))

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*input_ids.shape, len(tokenizer))  # (B, T, V)
        for b, row in enumerate(input_ids.tolist()):
            n = int(attention_mask[b].sum())
            first = n - row[:n][::-1].index(tokenizer.bos_token_id) + opener  # answer start
            for t in range(first - 1, min(n, first - 1 + len(script))):
                logits[b, t, script[t - first + 1]] = boost
        return logits

    return forward


def _recording(forward):
    """Wrap a forward so that it records every unpadded row it is given."""
    seen: list[list[int]] = []

    def spy(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seen.extend(row[: int(m.sum())] for row, m in zip(ids.tolist(), mask, strict=True))
        return forward(ids, mask)

    return spy, seen


def test_scoring_the_gold_answer_uses_exactly_the_training_ids_and_labels(tiny, sample):
    """Regression: with truncation, the gold candidate's row is the training row, token for token.

    Prompts used to be cut for each example's *own* answer in training but for the longest
    answer in scoring, so for every shorter gold answer the scored prompt differed from the
    trained one (and the cut position told the model the label).
    """
    # Prepare: every text is cut at TIGHT, and the golds include answers shorter than the longest
    model, tok = tiny.model, tiny.tokenizer
    enc = encode_instruction(sample, tok, TIGHT, SHORT)
    roomy = encode_instruction(sample, tok, ROOMY, SHORT)
    longest = max(len(answer_token_ids(tok, a)) for a in NAMES)
    cut = enc["prompt_lengths"] < roomy["prompt_lengths"]
    assert bool(cut.all())
    shorter_gold = [len(answer_token_ids(tok, NAMES[y])) < longest for y in sample.labels()]
    assert any(shorter_gold)  # the case the old layout got wrong
    # Execute
    spy, seen = _recording(full_slice(model))
    got = score_answers(spy, tok, sample, max_length=TIGHT, batch_size=4, task_prompt=SHORT)
    prompts = answer_prompts(tok, sample, max_length=TIGHT, task_prompt=SHORT)
    # Assert: the prompt scored is the prompt trained, and the gold row was run as it is trained
    for i, y in enumerate(sample.labels()):
        n, p = int(enc["attention_mask"][i].sum()), int(enc["prompt_lengths"][i])
        train_ids, train_labels = enc["input_ids"][i, :n], enc["labels"][i, :n]
        assert prompts[i] == train_ids[:p].tolist()
        gold = [*answer_token_ids(tok, NAMES[y]), tok.eos_token_id]
        assert train_ids.tolist() == prompts[i] + gold
        assert train_labels.tolist() == [IGNORE_INDEX] * p + gold
        assert train_ids.tolist() in seen
        # the gold log-likelihood is minus the training loss of that row, summed over its labels
        with torch.no_grad():
            logits = model(input_ids=train_ids[None]).logits  # (1, n, V)
        loss = task_loss(logits, train_labels[None], "causal-lm") * len(gold)
        assert got["log_likelihoods"][i][y] == pytest.approx(-float(loss), abs=1e-3)
        # every other candidate is scored after the very same prompt
        for c in range(len(NAMES)):
            row = prompts[i] + [*answer_token_ids(tok, NAMES[c]), tok.eos_token_id]
            assert len(row) <= TIGHT and row in seen
    assert len(seen) == len(sample) * len(NAMES)


def test_prompts_do_not_depend_on_the_label(tiny, sample):
    # Prepare: the same examples under every label
    tok = tiny.tokenizer
    relabelled = [
        Dataset([dataclasses.replace(ex, label=c) for ex in sample], NAMES, sample.name)
        for c in range(len(NAMES))
    ]
    # Execute
    encs = [encode_instruction(ds, tok, TIGHT, SHORT) for ds in relabelled]
    # Assert: identical prompts, whose lengths therefore carry no trace of the answer
    first = encs[0]
    for enc in encs[1:]:
        assert torch.equal(enc["prompt_lengths"], first["prompt_lengths"])
        for i in range(len(sample)):
            p = int(first["prompt_lengths"][i])
            assert torch.equal(enc["input_ids"][i, :p], first["input_ids"][i, :p])
    # the rows differ only after the prompt, and the longest answer still fits
    assert not torch.equal(encs[0]["labels"], encs[4]["labels"])
    assert int(encs[4]["attention_mask"].sum(1).max()) <= TIGHT


def test_a_model_trained_to_overfit_a_handful_of_examples_scores_them_correctly(sample):
    """End to end: what training teaches (on cut prompts) is what scoring and generation read."""
    # Prepare: a fresh tiny model, five cut examples with four different answers
    loaded = load_model("tiny-llama", "causal-lm", seed=0)
    model, tok = loaded.model, loaded.tokenizer
    assert len(set(sample.labels())) >= 3
    enc = encode_instruction(sample, tok, TIGHT, SHORT)
    whole = full_slice(model)
    kw = {"max_length": TIGHT, "batch_size": 25, "task_prompt": SHORT}
    model.eval()
    before = score_answers(whole, tok, sample, **kw)
    # Execute: full-batch AdamW on the answer-only loss until the examples are memorised: every
    # answer token the argmax by a clear margin (so greedy generation, whose batches have other
    # shapes and so other float rounding, reads the same tokens on any CPU's kernels)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    targets = enc["labels"][:, 1:]  # (5, T-1), token t+1 is predicted at t
    answer = targets != IGNORE_INDEX
    index = targets.clamp(min=0)[..., None]  # (5, T-1, 1), prompt positions read token 0
    for _ in range(300):  # about 110 steps
        logits = whole(enc["input_ids"], enc["attention_mask"])  # (5, T, V)
        loss = task_loss(logits, enc["labels"], "causal-lm")
        logp = logits[:, :-1].detach().log_softmax(-1)  # (5, T-1, V)
        gold = logp.gather(-1, index)[..., 0]  # (5, T-1)
        runner_up = logp.scatter(-1, index, -torch.inf).amax(-1)
        if bool((gold - runner_up)[answer].min() > 1.0):  # gold beats every other token by e
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    else:
        pytest.fail(f"not memorised in 300 steps (loss {loss.item():.3f})")
    model.eval()
    after = score_answers(whole, tok, sample, **kw)
    gen = generate_answers(
        whole, tok, sample, max_length=TIGHT, max_new_tokens=40, batch_size=5, task_prompt=SHORT
    )
    # Assert
    assert loss.item() < 0.1
    assert before["accuracy"] < 1.0  # an untrained model does not already get them right
    assert after["accuracy"] == 1.0 and after["predictions"] == sample.labels()
    assert gen["accuracy"] == 1.0 and gen["invalid_rate"] == 0.0


@pytest.mark.parametrize("favoured", [4, 3])
def test_a_hand_built_forward_decides_the_answer(tiny, sample, favoured):
    forward = _teacher_forward(NAMES[favoured], tiny.tokenizer)
    for batch_size in (1, 6):
        got = score_answers(
            forward, tiny.tokenizer, sample, max_length=ROOMY, batch_size=batch_size
        )
        assert got["predictions"] == [favoured] * 5
        assert got["per_class"][NAMES[favoured]]["predicted"] == 5
    gen = generate_answers(
        forward, tiny.tokenizer, sample, max_length=ROOMY, max_new_tokens=40, batch_size=3
    )
    assert gen["generations"] == [NAMES[favoured]] * 5
    assert gen["invalid_rate"] == 0.0
    assert gen["accuracy"] == sum(y == favoured for y in sample.labels()) / 5
    assert gen["examples"][0] == {
        "generation": NAMES[favoured],
        "label": NAMES[sample.labels()[0]],
        "prediction": NAMES[favoured],
        "valid": True,
    }


def test_split_path_scores_like_the_full_slice(tiny, sample):
    model, tok = tiny.model, tiny.tokenizer
    front, back = slice_model(model, 2)
    whole = full_slice(model)
    kw = {"max_length": ROOMY, "batch_size": 10, "task_prompt": SHORT}
    full = score_answers(whole, tok, sample, **kw)
    split = score_answers(lambda ids, mask: back(front(ids, mask), mask), tok, sample, **kw)
    torch.testing.assert_close(
        torch.tensor(split["log_likelihoods"]),
        torch.tensor(full["log_likelihoods"]),
        atol=1e-4,
        rtol=0,
    )
    assert split["predictions"] == full["predictions"]


def test_greedy_generation_matches_hf_generate_on_a_padded_batch(tiny, sample):
    # Prepare: prompts of different lengths in one right-padded batch
    model, tok = tiny.model, tiny.tokenizer
    prompts = answer_prompts(tok, sample, max_length=ROOMY, task_prompt=SHORT)
    assert len({len(p) for p in prompts}) > 1
    # Execute
    got = generate_answers(
        full_slice(model),
        tok,
        sample,
        max_length=ROOMY,
        max_new_tokens=4,
        batch_size=5,
        task_prompt=SHORT,
        stop_when_decided=False,  # every token, to compare the texts
    )
    # Assert: each row equals Hugging Face greedy decoding of that prompt alone
    for prompt, text in zip(prompts, got["generations"], strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=4,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        assert text == tok.decode(out[0, len(prompt) :], skip_special_tokens=True)


YES_NO = ["yes", "no", "maybe"]


@pytest.mark.parametrize(
    ("text", "names", "expected"),
    [
        ("Neoplasms.", NAMES, 0),
        ("neoplasms", NAMES, 0),
        ("  **Neoplasms**\n", NAMES, 0),
        ("Digestive  System\nDiseases, probably", NAMES, 1),
        ("General pathological conditions!", NAMES, 4),
        ("I think neoplasms", NAMES, None),
        ("neoplasmsx", NAMES, None),
        ("nervous", NAMES, None),  # only part of a name
        ("", NAMES, None),
        ("Maybe!", YES_NO, 2),
        ("No.", YES_NO, 1),
        ("nothing", YES_NO, None),
        ("Yes sir.", ["yes", "yes sir"], 1),  # the longer name wins over its prefix
        ("yes", ["Yes", "yes"], None),  # two names match: ambiguous
        ("Neoplasms.", ["Neoplasms.", "other"], 0),  # trailing punctuation of a name ignored
    ],
)
def test_parse_answer(text, names, expected):
    assert parse_answer(text, names) == expected


@pytest.mark.parametrize(
    ("text", "names", "decided"),
    [
        ("The", NAMES, True),  # no answer starts with "the": invalid whatever follows
        ("Neoplasms.", NAMES, True),
        ("Neoplasms", NAMES, False),  # "Neoplasmsx" would be invalid
        ("Neoplasms ", NAMES, False),  # trailing space is dropped by normalisation
        ("  **Dig", NAMES, False),
        ("Digestive system", NAMES, False),
        ("Digestive systems", NAMES, True),
        ("", NAMES, False),
        ("**", NAMES, False),  # only what the parser strips from the front
        ("yes", ["yes", "yes sir"], False),
        ("yes s", ["yes", "yes sir"], False),
        ("yes, sir", ["yes", "yes sir"], True),
        ("no\ufffd", YES_NO, False),  # a character still being decoded
    ],
)
def test_answer_decided(text, names, decided):
    assert answer_decided(text, names) is decided


def test_a_decided_parse_never_changes():
    # every prefix of a set of generations, against every continuation of it
    texts = [
        "Neoplasms. They grow.",
        "The abstract describes neoplasms",
        "  **Digestive system diseases**",
        "Nervous systemic",
        "yes sir, maybe",
        "Maybe yes",
        "nope",
        "General pathological conditions",
    ]
    for names in (NAMES, YES_NO, ["yes", "yes sir"]):
        for text in texts:
            for cut in range(len(text) + 1):
                head = text[:cut]
                if answer_decided(head, names):
                    for end in range(cut, len(text) + 1):
                        assert parse_answer(text[:end], names) == parse_answer(head, names), (
                            head,
                            text[:end],
                        )


def test_stopping_when_decided_keeps_every_prediction(tiny, sample):
    # Prepare: a random tiny model (mostly invalid text) and a forward that answers correctly
    tok = tiny.tokenizer
    kw = {"max_length": ROOMY, "max_new_tokens": 12, "batch_size": 3, "task_prompt": SHORT}
    calls = {"early": 0, "full": 0}

    def counted(key):
        def forward(ids, mask):
            calls[key] += 1
            return full_slice(tiny.model)(ids, mask)

        return forward

    # Execute
    early = generate_answers(counted("early"), tok, sample, **kw)
    full = generate_answers(counted("full"), tok, sample, stop_when_decided=False, **kw)
    # Assert: the same predictions and validity, each cut text a prefix of the full one
    assert early["predictions"] == full["predictions"]
    assert early["invalid_rate"] == full["invalid_rate"]
    assert early["accuracy"] == full["accuracy"]
    for cut, whole in zip(early["generations"], full["generations"], strict=True):
        assert whole.startswith(cut)
    assert calls["early"] < calls["full"]


def test_seq_cls_logits_are_refused(sample, tiny):
    def forward(ids, mask):
        return torch.zeros(ids.shape[0], 5)

    with pytest.raises(ModelError, match="token logits"):
        score_answers(forward, tiny.tokenizer, sample, max_length=ROOMY, batch_size=4)


# ------------------------------------------------------------------------------------------
# wiring into the recipes
# ------------------------------------------------------------------------------------------


def _cfg(tmp_path, *extra):
    return load_config(
        None,
        [
            "data.dataset=medical_sample",
            "data.max_length=256",
            "data.max_train_examples=8",
            "data.max_test_examples=3",
            "model.name=tiny-llama",
            "model.task=causal-lm",
            "train.batch_size=8",
            "train.eval_batch_size=16",
            "train.max_steps=2",
            "train.epochs=1",
            f"output_dir={tmp_path}",
            *extra,
        ],
    )


def test_local_recipe_reports_answer_metrics_and_zero_shot(tmp_path):
    run = run_local(
        _cfg(tmp_path, "train.zero_shot=true", "train.eval_generation=true", "run_name=zs")
    )
    summary = json.loads((run / "summary.json").read_text())
    for key in ("loss", "perplexity", "accuracy", "macro_f1", "gen_accuracy", "gen_invalid_rate"):
        assert key in summary and f"zero_shot_{key}" in summary
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    assert summary["history"][0]["step"] == 0
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in evals if r["kind"] == "eval"] == [0, 1]
    # the zero-shot pass changes nothing about training
    plain = json.loads((run_local(_cfg(tmp_path, "run_name=plain")) / "summary.json").read_text())
    assert "zero_shot_loss" not in plain and "gen_accuracy" not in plain
    assert plain["loss"] == summary["loss"] and plain["accuracy"] == summary["accuracy"]


def test_plain_split_reports_answer_metrics(tmp_path):
    run = run_plain_split(_cfg(tmp_path, "mode=plain-split", "split.cut=2", "run_name=s"))
    summary = json.loads((run / "summary.json").read_text())
    assert {"loss", "perplexity", "accuracy", "macro_f1", "mean_token_accuracy"} <= set(summary)
    assert "gen_accuracy" not in summary
