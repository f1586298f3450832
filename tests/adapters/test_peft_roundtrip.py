"""LoRA and P-tuning v2 on slices: only adapter tensors train, and exports load in PEFT exactly."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import TINY_CASES, padded_batch
from peft import PeftModel

from shieldtune.adapters import ADAPTERS, parse_config, register_adapter
from shieldtune.adapters.lora import LoraSettings, attach_lora
from shieldtune.adapters.prefix import PrefixSettings, attach_prefix
from shieldtune.errors import ConfigError
from shieldtune.models import full_slice, load_model, slice_model

ATTACH = {
    "lora": lambda s, m: attach_lora(s, m, LoraSettings(rank=4)),
    "prefix": lambda s, m: attach_prefix(s, m, PrefixSettings(num_virtual_tokens=3)),
    "prefix-mlp": lambda s, m: attach_prefix(
        s, m, PrefixSettings(num_virtual_tokens=3, projection=True)
    ),
}


def _perturb(adapter) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("method", sorted(ATTACH))
@pytest.mark.parametrize(("name", "task"), TINY_CASES)
def test_export_loads_in_peft_with_identical_logits(tmp_path, name, task, method):
    # Prepare: a trained-looking adapter on the full model
    ids, mask = padded_batch()
    model = load_model(name, task, num_labels=3).model
    whole = full_slice(model)
    adapter = ATTACH[method](whole, model)
    _perturb(adapter)
    ours = whole.eval()(ids, mask)
    # Execute
    adapter.save(tmp_path, base_model=name)
    peft = PeftModel.from_pretrained(load_model(name, task, num_labels=3).model, str(tmp_path))
    theirs = peft.eval()(input_ids=ids, attention_mask=mask).logits
    # Assert
    real = mask.bool() if task == "causal-lm" else slice(None)
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    assert (
        json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"]
        == name
    )


@pytest.mark.parametrize("method", sorted(ATTACH))
def test_only_adapter_and_head_train(method):
    model = load_model("tiny-llama", "seq-cls", num_labels=3).model
    whole = full_slice(model)
    adapter = ATTACH[method](whole, model)
    trainable = {id(p) for p in whole.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter.trainable_parameters()}
    names = set(adapter.state_dict())
    assert any("score" in n for n in names)  # the fresh head trains
    assert all(("lora_" in n) or n.startswith("prefix.") or "score" in n for n in names)


def test_lora_on_back_slice_touches_only_back_layers(tmp_path):
    model = load_model("tiny-llama", "causal-lm").model
    front, back = slice_model(model, 2)
    adapter = attach_lora(back, model, LoraSettings(rank=2))
    names = adapter.state_dict()
    assert names and all(".layers.2." in n or ".layers.3." in n for n in names)
    assert not any("lora_" in n for n, _ in front.named_parameters())
    adapter.save(tmp_path, base_model="tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [2, 3]


def test_state_dict_round_trip_and_mismatch_refused():
    model = load_model("tiny-gpt2", "seq-cls", num_labels=2).model
    a = attach_prefix(full_slice(model), model, PrefixSettings(num_virtual_tokens=2))
    state = a.state_dict()
    _perturb(a)
    a.load_state_dict(state)
    for k, v in a.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(ConfigError, match="does not match"):
        a.load_state_dict({"x": torch.zeros(1)})
    bad = dict(state)
    key = next(iter(bad))
    bad[key] = torch.zeros(1)
    with pytest.raises(ConfigError, match="shape"):
        a.load_state_dict(bad)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"lora\.rank"):
        parse_config(LoraSettings, {"rank": 0}, "lora")
    with pytest.raises(ConfigError, match=r"lora\.ranks"):
        parse_config(LoraSettings, {"ranks": 4}, "lora")
    with pytest.raises(ConfigError, match=r"lora\.target_modules"):
        model = load_model("tiny-llama", "causal-lm").model
        attach_lora(full_slice(model), model, LoraSettings(target_modules=["nope"]))


def test_registry_is_closed_and_refuses_duplicates():
    assert {"lora", "prefix", "full"} <= set(ADAPTERS.names())
    with pytest.raises(ValueError, match="already registered"):
        register_adapter(name="lora", config_cls=LoraSettings, attach=attach_lora, prefix="x")
    with pytest.raises(ConfigError, match="unknown adapter method 'dora'"):
        ADAPTERS.get("dora")
