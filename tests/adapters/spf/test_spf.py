"""Tests of SPF: saliency, exact-k masks, training only the chosen entries, exact deltas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from shieldtune.adapters.spf import (
    SPF_PREFIX,
    DeltaEntry,
    SparseDelta,
    SPFConfig,
    SPFModel,
    apply_delta,
    average_deltas,
    score,
    select_targets,
    top_k_mask,
)
from shieldtune.errors import ConfigError, IntegrityError

# ----------------------------------------------------------------------------- tiny models


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one intra-op thread is faster and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def _regression(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=gen)  # (N, 8)
    y = torch.randn(64, 4, generator=gen)  # (N, 4)
    return x, y


def _mse_loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def loss_fn(i: int) -> torch.Tensor:
        rows = slice(16 * (i % 4), 16 * (i % 4 + 1))
        return nn.functional.mse_loss(model(x[rows]), y[rows])

    return loss_fn


def _llama(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def _tokens(seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (4, 12), generator=gen)  # (B, T)


def _train_llama(density: float = 0.05, steps: int = 8):
    """Wrap a tiny LLaMA with gradient SPF and train it; return (base copy, model, spf, losses)."""
    model = _llama()
    base = copy.deepcopy(model)
    ids = _tokens()
    spf = SPFModel.from_saliency(
        model,
        SPFConfig(density=density, warmup_batches=2),
        loss_fn=lambda i: model(ids, labels=ids).loss,
    )
    opt = torch.optim.AdamW(spf.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return base, model, spf, losses


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("density", [1e-4, 0.01, 0.1, 1 / 3, 0.5, 0.999, 1.0])
def test_top_k_mask_selects_exactly_k_even_with_ties(density: float) -> None:
    # Prepare: integer scores, so most entries tie
    gen = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.randint(0, 3, (10, 7), generator=gen).float(),
        "b": torch.randint(0, 3, (13,), generator=gen).float(),
    }
    total = 83
    # Execute
    masks = top_k_mask(scores, density)
    # Assert
    selected = sum(int(m.sum()) for m in masks.values())
    assert selected == max(1, round(density * total))
    assert masks["a"].shape == (10, 7) and masks["b"].dtype == torch.bool


def test_density_one_selects_every_entry() -> None:
    # Prepare
    scores = {"a": torch.rand(4, 5), "b": torch.zeros(3)}
    # Execute
    masks = top_k_mask(scores, 1.0)
    # Assert
    assert all(bool(m.all()) for m in masks.values())


def test_top_k_mask_is_global_and_picks_the_largest_scores() -> None:
    # Prepare: the three largest scores are spread over two parameters
    scores = {
        "a": torch.tensor([0.1, 0.9, 0.2]),
        "b": torch.tensor([[0.8, 0.05], [0.7, 0.3]]),
    }
    # Execute
    masks = top_k_mask(scores, 3 / 7)
    # Assert
    assert masks["a"].tolist() == [False, True, False]
    assert masks["b"].tolist() == [[True, False], [True, False]]


def test_top_k_mask_breaks_ties_by_position() -> None:
    # Prepare
    scores = {"a": torch.ones(3), "b": torch.ones(2, 2)}
    # Execute
    masks = top_k_mask(scores, 4 / 7)
    # Assert: the first four positions (a then b, row-major) win
    assert masks["a"].tolist() == [True, True, True]
    assert masks["b"].tolist() == [[True, False], [False, False]]


@pytest.mark.parametrize("rule", ["gradient", "magnitude", "random"])
def test_each_rule_is_deterministic_for_a_seed(rule: str) -> None:
    # Prepare
    x, y = _regression()
    one, two = _mlp(), _mlp()
    config = SPFConfig(density=0.2, saliency=rule, seed=3)
    # Execute
    first = SPFModel.from_saliency(one, config, loss_fn=_mse_loss_fn(one, x, y))
    second = SPFModel.from_saliency(two, config, loss_fn=_mse_loss_fn(two, x, y))
    # Assert
    assert first.indices.keys() == second.indices.keys()
    for name, idx in first.indices.items():
        assert torch.equal(idx, second.indices[name])


def test_random_rule_depends_on_the_seed() -> None:
    # Prepare
    params = select_targets(_mlp(), None)
    # Execute
    masks = [
        top_k_mask(score(params, "random", generator=torch.Generator().manual_seed(s)), 0.2)
        for s in (0, 1)
    ]
    # Assert
    assert not all(torch.equal(masks[0][n], masks[1][n]) for n in params)


def test_gradient_rule_ranks_a_used_parameter_above_an_unused_one() -> None:
    # Prepare: "unused" never takes part in the loss
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(8, 4), "unused": nn.Linear(8, 4)})
    x = torch.randn(16, 8)  # (N, 8)

    def loss_fn(i: int) -> torch.Tensor:
        return model["used"](x).pow(2).mean()

    params = select_targets(model, None)
    # Execute
    scores = score(params, "gradient", loss_fn=loss_fn, warmup_batches=2)
    masks = top_k_mask(scores, 0.5)
    # Assert
    assert bool(masks["used.weight"].all())
    assert not bool(masks["unused.weight"].any())
    assert float(scores["unused.weight"].abs().sum()) == 0.0


def test_gradient_saliency_leaves_no_grad_and_restores_requires_grad() -> None:
    # Prepare: one parameter frozen before
    x, y = _regression()
    model = _mlp()
    model[0].bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    params = select_targets(model, None)
    # Execute
    score(params, "gradient", loss_fn=_mse_loss_fn(model, x, y), warmup_batches=3)
    # Assert
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_gradient_rule_without_loss_fn_is_refused() -> None:
    # Prepare
    model = _mlp()
    # Execute / Assert
    with pytest.raises(ConfigError, match="spf.saliency"):
        SPFModel.from_saliency(model, SPFConfig(saliency="gradient"))


# ----------------------------------------------------------------------------- targets


def test_default_targets_are_the_linear_weights_only() -> None:
    # Prepare
    model = _llama()
    # Execute
    targets = select_targets(model, None)
    # Assert: 7 matmuls per layer + lm_head; no embedding, norm or bias
    assert len(targets) == 2 * 7 + 1
    assert "lm_head.weight" in targets
    assert not any("embed" in n or "norm" in n for n in targets)


def test_default_targets_skip_a_tied_head_and_naming_it_is_refused() -> None:
    # Prepare
    model = _llama(tie=True)
    # Execute
    targets = select_targets(model, None)
    # Assert
    assert "lm_head.weight" not in targets
    with pytest.raises(ConfigError, match="tied"):
        select_targets(model, ["lm_head"])


def test_default_targets_include_hf_conv1d_weights() -> None:
    # Prepare: GPT-2 uses transformers' Conv1D and ties lm_head to wte
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    )
    # Execute
    targets = select_targets(model, None)
    # Assert
    assert sorted(targets) == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight",
    ]


def test_patterns_match_module_names_suffixes_and_regexes() -> None:
    # Prepare
    model = _llama()
    # Execute
    by_suffix = select_targets(model, ["q_proj"])
    by_regex = select_targets(model, [r"model\.layers\.0\..*_proj\.weight"])
    embeddings = select_targets(model, ["embed_tokens"])
    # Assert
    assert sorted(by_suffix) == [f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)]
    assert len(by_regex) == 7
    assert list(embeddings) == ["model.embed_tokens.weight"]


def test_a_pattern_matching_nothing_is_refused_with_available_names() -> None:
    # Prepare
    model = _mlp()
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"spf.target_modules.*matched no parameter.*0\.weight"):
        SPFModel.from_saliency(model, SPFConfig(saliency="magnitude", target_modules=["nope"]))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan")])
def test_bad_density_is_a_config_error_naming_the_field(density: float) -> None:
    # Prepare
    data = {"density": density}
    # Execute
    with pytest.raises(ConfigError) as info:
        SPFConfig.parse(data)
    # Assert
    assert f"spf.density: {density} is outside (0, 1]" in str(info.value)


def test_parse_collects_every_problem() -> None:
    # Prepare
    data = {"saliency": "fisher", "warmup_batches": 0, "colour": "red"}
    # Execute
    with pytest.raises(ConfigError) as info:
        SPFConfig.parse(data)
    # Assert
    problems = " | ".join(info.value.problems)
    assert (
        "spf.saliency: 'fisher' is not accepted; accepted: gradient, magnitude, random" in problems
    )
    assert "spf.warmup_batches: 0 is below 1" in problems
    assert "spf.colour: unknown key" in problems


def test_parse_accepts_a_valid_section() -> None:
    # Prepare / Execute
    config = SPFConfig.parse({"density": 0.1, "saliency": "random", "target_modules": ["fc"]})
    # Assert
    assert config.density == 0.1 and config.warmup_batches == 4 and config.seed == 0


# ----------------------------------------------------------------------------- training


def test_a_freshly_wrapped_model_is_numerically_identical() -> None:
    # Prepare
    model = _llama()
    base = copy.deepcopy(model)
    ids = _tokens()
    # Execute
    SPFModel.from_saliency(model, SPFConfig(density=0.1, saliency="magnitude"))
    # Assert
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_adamw_with_weight_decay_changes_only_the_masked_entries() -> None:
    # Prepare: the optimizer even sees every parameter of the module
    x, y = _regression()
    model = _mlp()
    base = copy.deepcopy(model)
    spf = SPFModel.from_saliency(model, SPFConfig(density=0.1), loss_fn=_mse_loss_fn(model, x, y))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    # Execute
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    indices = spf.indices
    spf.merge()
    # Assert
    assert losses[-1] < losses[0]
    trained, original = dict(model.named_parameters()), dict(base.named_parameters())
    for name, param in trained.items():
        changed = (param != original[name]).reshape(-1)  # (numel,)
        allowed = torch.zeros_like(changed)
        if name in indices:
            allowed[indices[name]] = True
        assert not bool(changed[~allowed].any()), name
    assert sum(int(i.numel()) for i in indices.values()) == round(0.1 * (8 * 16 + 16 * 4))


def test_trainable_parameters_are_only_the_values() -> None:
    # Prepare
    model = _mlp()
    # Execute
    spf = SPFModel.from_saliency(model, SPFConfig(density=0.25, saliency="magnitude"))
    # Assert
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in spf.trainable_parameters()}
    assert sum(p.numel() for p in trainable) == round(0.25 * (8 * 16 + 16 * 4))


def test_llm_loss_decreases_and_delta_reproduces_the_model_bitwise(tmp_path) -> None:
    # Prepare
    base, model, spf, losses = _train_llama()
    ids = _tokens()
    path = tmp_path / "delta.safetensors"
    # Execute
    spf.export_delta().save(path)
    fresh = apply_delta(copy.deepcopy(base), SparseDelta.load(path, module=base))
    # Assert
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    spf.merge()
    trained = model.state_dict()
    assert trained.keys() == fresh.state_dict().keys()
    assert all(torch.equal(t, trained[k]) for k, t in fresh.state_dict().items())


def test_merge_equals_the_parametrized_forward_and_restores_plain_weights() -> None:
    # Prepare
    base, model, spf, _ = _train_llama(steps=3)
    ids = _tokens()
    with torch.no_grad():
        before = model(ids).logits
    # Execute
    spf.merge()
    # Assert
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_delta_round_trip_is_bitwise_in_each_dtype(tmp_path, dtype: torch.dtype) -> None:
    # Prepare
    x, y = _regression()
    model = _mlp().to(dtype)
    base = copy.deepcopy(model)
    spf = SPFModel.from_saliency(model, SPFConfig(density=0.3, saliency="random"))
    opt = torch.optim.AdamW(spf.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        loss = nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Execute
    spf.export_delta().save(tmp_path / "d.safetensors")
    fresh = apply_delta(base, SparseDelta.load(tmp_path / "d.safetensors"))
    # Assert
    with torch.no_grad():
        assert torch.equal(fresh(x.to(dtype)), model(x.to(dtype)))
    assert all(v.dtype == dtype for v in spf.trainable_parameters())


def test_state_dict_adapter_tensors_carry_the_spf_prefix() -> None:
    # Prepare
    model = _mlp()
    # Execute
    SPFModel.from_saliency(model, SPFConfig(density=0.3, saliency="random"))
    # Assert
    keys = sorted(k for k in model.state_dict() if SPF_PREFIX in k)
    assert keys == [
        f"{i}.parametrizations.weight.0.spf_{t}" for i in (0, 2) for t in ("indices", "values")
    ]


def test_delta_size_is_indices_plus_values() -> None:
    # Prepare
    model = _mlp()
    spf = SPFModel.from_saliency(model, SPFConfig(density=0.1, saliency="magnitude"))
    # Execute
    delta = spf.export_delta()
    # Assert
    assert delta.nbytes() == delta.nnz * (8 + 4)
    assert math.isclose(
        delta.density, delta.nnz / sum(math.prod(e.shape) for e in delta.entries.values())
    )


# ----------------------------------------------------------------------------- refused deltas


def _saved_delta(tmp_path):
    model = _mlp()
    spf = SPFModel.from_saliency(model, SPFConfig(density=0.2, saliency="random"))
    assert set(spf.indices) == {"0.weight", "2.weight"}
    for values in spf.trainable_parameters():
        values.data.fill_(0.5)
    path = tmp_path / "delta.safetensors"
    spf.export_delta().save(path)
    return path


def _tamper(path, change) -> None:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def _set_index(t, m):
    t["0.weight.indices"][-1] = 10_000


def _set_nan(t, m):
    t["0.weight.values"][0] = float("nan")


def _drop_value(t, m):
    t["2.weight.values"] = t["2.weight.values"][:-1].clone()


def _unsort(t, m):
    t["2.weight.indices"] = t["2.weight.indices"].flip(0).contiguous()


@pytest.mark.parametrize(
    ("change", "param", "why"),
    [
        (_set_index, "0.weight", "out of range"),
        (_set_nan, "0.weight", "NaN"),
        (_drop_value, "2.weight", "indices but"),
        (_unsort, "2.weight", "strictly increasing"),
    ],
)
def test_a_corrupted_delta_file_is_refused_naming_the_parameter(tmp_path, change, param, why):
    # Prepare
    path = _saved_delta(tmp_path)
    _tamper(path, change)
    # Execute / Assert
    with pytest.raises(IntegrityError, match=f"{param}.*{why}"):
        SparseDelta.load(path)


def test_a_delta_of_the_wrong_shape_is_refused_naming_the_parameter(tmp_path) -> None:
    # Prepare: metadata claims 0.weight is (16, 16); the module's is (16, 8)
    path = _saved_delta(tmp_path)
    _tamper(path, lambda t, m: m.update(shapes=m["shapes"].replace("[16, 8]", "[16, 16]")))
    delta = SparseDelta.load(path)
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"0\.weight: delta shape \(16, 16\)"):
        apply_delta(_mlp(), delta)
    with pytest.raises(ConfigError, match=r"0\.weight"):
        SparseDelta.load(path, module=_mlp())


def test_a_delta_for_other_parameters_is_refused() -> None:
    # Prepare
    delta = SparseDelta({"fc.weight": DeltaEntry(torch.tensor([0]), torch.ones(1), (4, 8))})
    # Execute / Assert
    with pytest.raises(ConfigError, match="fc.weight: no such plain parameter"):
        apply_delta(_mlp(), delta)


def test_a_file_that_is_not_an_spf_delta_is_refused(tmp_path) -> None:
    # Prepare
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.ones(2)}, str(other))
    # Execute / Assert
    with pytest.raises(IntegrityError, match="not a readable"):
        SparseDelta.load(garbage)
    with pytest.raises(IntegrityError, match="not an SPF delta"):
        SparseDelta.load(other)


# ----------------------------------------------------------------------------- averaging


def test_average_deltas_is_the_weighted_mean_with_missing_entries_as_zero() -> None:
    # Prepare
    one = SparseDelta({"w": DeltaEntry(torch.tensor([0, 2]), torch.tensor([1.0, 2.0]), (2, 2))})
    two = SparseDelta(
        {
            "w": DeltaEntry(torch.tensor([2, 3]), torch.tensor([4.0, 8.0]), (2, 2)),
            "v": DeltaEntry(torch.tensor([1]), torch.tensor([4.0]), (3,)),
        }
    )
    # Execute
    mean = average_deltas([(one, 1.0), (two, 3.0)])
    # Assert
    assert mean.entries["w"].indices.tolist() == [0, 2, 3]
    assert mean.entries["w"].values.tolist() == [0.25, 3.5, 6.0]
    assert mean.entries["v"].values.tolist() == [3.0]
    assert mean.entries["w"].shape == (2, 2)


def test_average_deltas_refuses_bad_weights_and_shape_clashes() -> None:
    # Prepare
    a = SparseDelta({"w": DeltaEntry(torch.tensor([0]), torch.ones(1), (2, 2))})
    b = SparseDelta({"w": DeltaEntry(torch.tensor([0]), torch.ones(1), (4,))})
    # Execute / Assert
    with pytest.raises(ConfigError, match="weights"):
        average_deltas([(a, 0.0)])
    with pytest.raises(ConfigError, match="w has different shapes"):
        average_deltas([(a, 1.0), (b, 1.0)])
