"""Every model path on the real SmolLM2 weights: presets, slicing, answer masking, PEFT export.

Fast tests run on the first 2 decoder layers of SmolLM2-135M-Instruct (``smollm2_folder(
num_layers=2)`` in the user's cache: the first call ever converts the GGUF once, ~25 s; later
calls load in well under a second). One slow test slices the full 30-layer model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from shieldtune.adapters.lora import LoraSettings, attach_lora
from shieldtune.adapters.prefix import PrefixSettings, attach_prefix
from shieldtune.data.builtin import load_builtin
from shieldtune.data.splits import subset
from shieldtune.data.tables import Dataset
from shieldtune.data.tasks import IGNORE_INDEX, answer_token_ids, encode_instruction
from shieldtune.models import full_slice, load_model, slice_model, smollm2
from shieldtune.training import task_loss
from shieldtune.training.answers import answer_prompts, score_answers

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(smollm2.MODULE) is None,
    reason=f"{smollm2.DISTRIBUTION} is not installed (`{smollm2.INSTALL_COMMAND}`)",
)

TEXTS = [
    "Hypertension is a chronic condition in which the blood pressure in the arteries is raised.",
    "Aspirin reduces the risk of stroke.",
    "Colorectal adenomas were removed.",
]


@pytest.fixture(scope="module")
def short_folder() -> Path:
    return smollm2.smollm2_folder(num_layers=2)


def _load(folder: Path, task: str, num_labels: int | None = None):
    return load_model(str(folder), task, num_labels, seed=0)  # the preset machinery, folder path


def _batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "right" and (enc["attention_mask"] == 0).any()
    return enc["input_ids"], enc["attention_mask"]


def _loss(logits: torch.Tensor, mask: torch.Tensor, task: str) -> torch.Tensor:
    if task == "causal-lm":
        return (logits.float().pow(2).mean(-1) * mask).sum() / mask.sum()
    return logits.float().pow(2).sum()


def test_short_model_loads_for_both_tasks(short_folder):
    lm = _load(short_folder, "causal-lm")
    cls = _load(short_folder, "seq-cls", num_labels=5)
    assert lm.num_layers == cls.num_layers == 2
    assert lm.model.config.num_hidden_layers == 2 and lm.model.config.hidden_size == 576
    tok = lm.tokenizer
    assert tok.chat_template and tok.padding_side == "right"
    assert tok.pad_token_id == tok.eos_token_id == lm.model.config.pad_token_id
    assert cls.model.score.out_features == 5
    torch.testing.assert_close(  # a fresh head on the same body
        cls.model.model.embed_tokens.weight, lm.model.model.embed_tokens.weight, atol=0, rtol=0
    )


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_slices_compose_to_the_short_model(short_folder, task):
    # Prepare
    loaded = _load(short_folder, task, 5 if task == "seq-cls" else None)
    model = loaded.model.eval()
    ids, mask = _batch(loaded.tokenizer)
    ref = model(input_ids=ids, attention_mask=mask).logits
    _loss(ref, mask, task).backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    params = dict(model.named_parameters())
    real = mask.bool() if task == "causal-lm" else slice(None)
    for cut in (0, 1, 2):
        model.zero_grad()
        front, back = slice_model(model, cut)
        # Execute
        out = back(front(ids, mask), mask)
        _loss(out, mask, task).backward()
        # Assert
        torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=0, msg=f"cut {cut}")
        for key, grad in ref_grads.items():
            torch.testing.assert_close(params[key].grad, grad, atol=1e-5, rtol=1e-4, msg=key)


def test_answer_only_loss_masking_on_the_chat_template(short_folder):
    # Prepare
    loaded = _load(short_folder, "causal-lm")
    tok = loaded.tokenizer
    ds = subset(load_builtin("medical_sample"), range(3))
    # Execute
    enc = encode_instruction(ds, tok, 256)
    # Assert
    for i, ex in enumerate(ds):
        n, p = int(enc["attention_mask"][i].sum()), int(enc["prompt_lengths"][i])
        ids, labels = enc["input_ids"][i, :n].tolist(), enc["labels"][i].tolist()
        answer = [*answer_token_ids(tok, ds.label_names[ex.label]), tok.eos_token_id]
        assert ids[p:] == answer and labels[p:n] == answer
        assert set(labels[:p]) == {IGNORE_INDEX} and set(labels[n:]) <= {IGNORE_INDEX}
        prompt = tok.decode(ids[:p])
        assert prompt.startswith("<|im_start|>system\n")
        assert prompt.endswith(f"{ex.text}<|im_end|>\n<|im_start|>assistant\n")
        assert tok.decode(ids[p:]) == ds.label_names[ex.label] + "<|im_end|>"
    # the loss is the answer tokens' cross-entropy: answer scoring gives the same number
    model = loaded.model.eval()
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        losses = [
            float(task_loss(logits[i : i + 1], enc["labels"][i : i + 1], "causal-lm"))
            for i in range(3)
        ]
    scored = score_answers(full_slice(model), tok, ds, max_length=256, batch_size=5)
    for i, ex in enumerate(ds):
        n_answer = len(answer_token_ids(tok, ds.label_names[ex.label])) + 1
        assert scored["log_likelihoods"][i][ex.label] == pytest.approx(
            -losses[i] * n_answer, abs=1e-3
        )


def test_cut_prompts_score_the_gold_answer_on_the_training_ids(short_folder):
    """Regression: with texts cut to fit, scoring the gold answer runs exactly the training row.

    Training used to cut each prompt for its own answer (1 to 5 tokens here) and scoring for
    the longest one, so the two disagreed for 4 of 5 classes and the cut encoded the label.
    """
    # Prepare: every abstract is cut at max_length 96, one example of each class
    loaded = _load(short_folder, "causal-lm")
    model, tok = loaded.model.eval(), loaded.tokenizer
    base = load_builtin("medical_sample")
    ds = Dataset(
        [next(ex for ex in base if ex.label == c) for c in range(5)], base.label_names, base.name
    )
    lengths = [len(answer_token_ids(tok, a)) for a in ds.label_names]
    assert len(set(lengths)) > 1  # answers of different lengths: the case that went wrong
    enc = encode_instruction(ds, tok, 96)
    assert int(enc["attention_mask"].sum(1).max()) <= 96
    assert bool((enc["prompt_lengths"] < encode_instruction(ds, tok, 512)["prompt_lengths"]).all())
    seen: list[list[int]] = []

    def spy(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seen.extend(row[: int(m.sum())] for row, m in zip(ids.tolist(), mask, strict=True))
        return full_slice(model)(ids, mask)

    # Execute
    scored = score_answers(spy, tok, ds, max_length=96, batch_size=7)
    prompts = answer_prompts(tok, ds, max_length=96)
    # Assert
    for c in range(5):  # the same prompts whatever the labels say
        relabelled = Dataset(
            [dataclasses.replace(ex, label=c) for ex in ds], ds.label_names, ds.name
        )
        other = encode_instruction(relabelled, tok, 96)
        assert torch.equal(other["prompt_lengths"], enc["prompt_lengths"])
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    for i, ex in enumerate(ds):
        n, p = int(enc["attention_mask"][i].sum()), int(enc["prompt_lengths"][i])
        ids, labels = enc["input_ids"][i, :n].tolist(), enc["labels"][i, :n].tolist()
        gold = [*answer_token_ids(tok, ds.label_names[ex.label]), tok.eos_token_id]
        assert prompts[i] == ids[:p] and ids == prompts[i] + gold and ids in seen
        assert labels == [IGNORE_INDEX] * p + gold
        # the answer's ids are those of the rendered conversation: no merge across the header
        assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids
        loss = float(task_loss(logits[i : i + 1, :n], enc["labels"][i : i + 1, :n], "causal-lm"))
        assert scored["log_likelihoods"][i][ex.label] == pytest.approx(-loss * len(gold), abs=1e-3)


ATTACH = {
    "lora": lambda s, m: attach_lora(s, m, LoraSettings(rank=4)),
    "prefix": lambda s, m: attach_prefix(s, m, PrefixSettings(num_virtual_tokens=4)),
}


@pytest.mark.parametrize("method", sorted(ATTACH))
def test_peft_round_trip_on_the_real_base(tmp_path, short_folder, method):
    # Prepare: a trained-looking adapter
    loaded = _load(short_folder, "causal-lm")
    model = loaded.model
    ids, mask = _batch(loaded.tokenizer)
    whole = full_slice(model)
    adapter = ATTACH[method](whole, model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        ours = whole.eval()(ids, mask)
        base = _load(short_folder, "causal-lm").model.eval()(input_ids=ids, attention_mask=mask)
    assert not torch.allclose(ours[mask.bool()], base.logits[mask.bool()], atol=1e-3)
    # Execute
    adapter.save(tmp_path, base_model=str(short_folder))
    peft = PeftModel.from_pretrained(_load(short_folder, "causal-lm").model, str(tmp_path))
    with torch.no_grad():
        theirs = peft.eval()(input_ids=ids, attention_mask=mask).logits
    # Assert
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_full_model_slices_compose_at_cut_15():
    # Prepare: the full model; gradients only for layers on both sides of the cut and at the ends
    loaded = _load(smollm2.smollm2_folder(), "causal-lm")
    assert loaded.num_layers == 30
    model = loaded.model.eval()
    checked = {f"model.layers.{i}." for i in (0, 14, 15, 29)}
    for key, param in model.named_parameters():
        param.requires_grad_(any(key.startswith(c) for c in checked))
    ids, mask = _batch(loaded.tokenizer)
    ids, mask = ids[:, :12], mask[:, :12]  # short: keeps the full model's test cheap
    ref = model(input_ids=ids, attention_mask=mask).logits
    _loss(ref, mask, "causal-lm").backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    assert len(ref_grads) == 4 * 9  # q k v o gate up down + 2 norms per layer
    model.zero_grad()
    front, back = slice_model(model, 15)
    # Execute
    out = back(front(ids, mask), mask)
    _loss(out, mask, "causal-lm").backward()
    # Assert
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)
    params = dict(model.named_parameters())
    for key, grad in ref_grads.items():
        torch.testing.assert_close(params[key].grad, grad, atol=1e-5, rtol=1e-4, msg=key)
