"""SPF on a whole seq-cls model: the classification head trains densely, once, and is exported."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from shieldtune.adapters import ADAPTERS, parse_config
from shieldtune.adapters.spf import SPFConfig, SPFModel
from shieldtune.adapters.spf.adapter import DELTA_FILE, HEAD_FILE
from shieldtune.errors import ConfigError
from shieldtune.models import load_model
from shieldtune.models.slicing import full_slice


def _spf(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = load_model(name, "seq-cls", 3).model
    entry = ADAPTERS.get("spf")
    settings = parse_config(entry.config_cls, {"density": 0.01, "saliency": "magnitude"}, "a")
    return model, entry.attach(full_slice(model), model, settings)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_the_head_is_trained_densely_once_and_never_sparsified(name: str) -> None:
    model, spf = _spf(name)
    params = spf.trainable_parameters()
    # each trainable tensor once (a duplicate would be stepped twice by AdamW)
    assert len({id(p) for p in params}) == len(params)
    head = dict(spf._head_named)
    assert head and not any("parametrizations" in n for n in head)  # plain, dense weights
    assert not any(n.startswith("head_mods.head.") for n in spf.spf.indices)  # (a pooler may)
    # one AdamW step moves every head entry but only the masked entries elsewhere
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(5, 100, (2, 8))
    logits = spf.slice(ids, torch.ones_like(ids))
    before = {n: p.detach().clone() for n, p in head.items()}
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    opt.step()
    for n, p in head.items():
        assert (p.detach() != before[n]).float().mean() > 0.5, n


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_the_head_travels_with_the_delta_and_round_trips(name: str, tmp_path) -> None:
    model, spf = _spf(name)
    with torch.no_grad():
        for p in spf.trainable_parameters():
            p.add_(torch.randn_like(p))
    state = spf.state_dict()
    assert set(spf._head_named) <= set(state)
    _, other = _spf(name, seed=1)
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key
    spf.save(tmp_path / "out", base_model=name)
    saved = load_file(str(tmp_path / "out" / HEAD_FILE))
    assert (tmp_path / "out" / DELTA_FILE).is_file()
    assert {n: torch.equal(saved[n], state[n]) for n in saved} == dict.fromkeys(
        spf._head_named, True
    )
    # a state without the head is refused, nothing half-loaded
    partial = {k: v for k, v in state.items() if k not in spf._head_named}
    with pytest.raises(ConfigError, match="plus the head"):
        other.load_state_dict(partial)


def test_naming_only_the_head_as_target_is_refused() -> None:
    torch.manual_seed(0)
    model = load_model("tiny-llama", "seq-cls", 3).model
    sl = full_slice(model)
    head = list(sl.head_mods["head"].parameters())
    with pytest.raises(ConfigError, match="trains densely"):
        SPFModel.from_saliency(sl, SPFConfig(density=0.5, target_modules=["head"]), exclude=head)
