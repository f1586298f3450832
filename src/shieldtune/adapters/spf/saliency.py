"""SPF saliency rules: which weights are targets, how entries are scored, which are kept.

Pure functions over parameters and tensors; nothing here changes a module. The pipeline is
``select_targets -> score -> top_k_mask``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from shieldtune.errors import ConfigError, ShieldtuneError

__all__ = ["select_targets", "score", "top_k_mask"]

_SHOWN = 8  # how many available names an error message lists


def select_targets(module: nn.Module, target_modules: list[str] | None) -> dict[str, nn.Parameter]:
    """Pick the parameters SPF may sparsify.

    With ``target_modules=None`` the targets are the 2-D ``weight`` of every ``nn.Linear`` and
    HF ``Conv1D`` (the matmul weights); embeddings, norms and biases are left out, and so is a
    weight shared with another module (e.g. an ``lm_head`` tied to the input embeddings).

    Otherwise a pattern selects a parameter when it equals the parameter's name, is a
    ``.``-separated suffix of it, or full-matches it as a regex; a pattern that does the same
    for a module name selects that module's ``weight``. ``"q_proj"`` therefore selects every
    ``...q_proj.weight``, and ``"embed_tokens"`` the embedding matrix.

    Args:
        module: The model (or front slice).
        target_modules: Patterns, or None for all linear weights.

    Returns:
        Parameter name (as in ``module.named_parameters()``) -> parameter, in module order.

    Raises:
        ConfigError: A pattern is not a valid regex, nothing matches (the message lists some
            available names), or a named parameter is shared with another module.
    """
    owners = _owners(module)
    if target_modules is None:
        found = {
            name: param
            for name, param in module.named_parameters()
            if _is_matmul(module, name) and param.dim() == 2 and len(owners[id(param)]) == 1
        }
        if not found:
            raise ConfigError(
                "spf.target_modules: the model has no nn.Linear/Conv1D weight; name the "
                f"parameters to sparsify; available: {_some(module)}"
            )
        return found
    patterns = [_compile(p) for p in target_modules]
    found = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        module_name, _, attr = name.rpartition(".")
        by_param = any(_matches(p, name) for p in patterns)
        by_module = attr == "weight" and any(_matches(p, module_name) for p in patterns)
        if (by_param or by_module) and ".parametrizations." not in name:
            found[name] = param
    if not found:
        raise ConfigError(
            f"spf.target_modules: {target_modules!r} matched no parameter; "
            f"available: {_some(module)}"
        )
    tied = [
        f"{name} (also {', '.join(n for n in owners[id(p)] if n != name)})"
        for name, p in found.items()
        if len(owners[id(p)]) > 1
    ]
    if tied:
        raise ConfigError(
            f"spf.target_modules: cannot sparsify shared (tied) parameters: {'; '.join(tied)}; "
            "untie them or leave them out of target_modules"
        )
    return found


def score(
    params: dict[str, nn.Parameter],
    rule: str,
    *,
    loss_fn: Callable[[int], Tensor] | None = None,
    warmup_batches: int = 4,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Score every entry of every target; a higher score means more salient.

    - ``"gradient"``: ``sum_i |dL_i/dW|`` over warm-up batches ``i = 0..warmup_batches-1``,
      with ``L_i = loss_fn(i)``. Gradients are taken with :func:`torch.autograd.grad`, so no
      ``.grad`` of any parameter is written; the targets' ``requires_grad`` flags are restored.
      An entry that receives no gradient scores 0.
    - ``"magnitude"``: ``|W|``.
    - ``"random"``: uniform in [0, 1) from ``generator`` (a CPU generator seeded 0 if None),
      drawn in the order of ``params``.

    Args:
        params: Name -> target parameter (from :func:`select_targets`).
        rule: ``"gradient"``, ``"magnitude"`` or ``"random"``.
        loss_fn: Returns the scalar loss of warm-up batch ``i``; needed by ``"gradient"``.
        warmup_batches: Number of warm-up batches for ``"gradient"``.
        generator: Random source for ``"random"``.

    Returns:
        Name -> float32 scores shaped like the parameter, on its device.

    Raises:
        ConfigError: Unknown rule, or ``"gradient"`` without ``loss_fn``.
        ShieldtuneError: A warm-up loss is not a differentiable scalar.
    """
    if rule == "magnitude":
        return {name: p.detach().abs().float() for name, p in params.items()}
    if rule == "random":
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        return {
            name: torch.rand(p.shape, generator=gen, device=gen.device).to(p.device)
            for name, p in params.items()
        }
    if rule == "gradient":
        if loss_fn is None:
            raise ConfigError(
                "spf.saliency: 'gradient' needs warm-up batches (a loss_fn); "
                "pass loss_fn or choose 'magnitude' or 'random'"
            )
        return _gradient_scores(params, loss_fn, warmup_batches)
    raise ConfigError(
        f"spf.saliency: {rule!r} is not accepted; accepted: gradient, magnitude, random"
    )


def top_k_mask(scores: dict[str, Tensor], density: float) -> dict[str, Tensor]:
    """Keep the ``k = max(1, round(density * total))`` highest scores, globally over all targets.

    Ties are broken deterministically: among equal scores the entry that comes first (targets in
    dict order, entries row-major) wins. Exactly ``k`` entries are selected.

    Args:
        scores: Name -> scores (any shapes), e.g. from :func:`score`.
        density: Fraction in (0, 1].

    Returns:
        Name -> bool mask shaped like its scores.

    Raises:
        ConfigError: ``density`` is outside (0, 1] or there are no scores.
        ShieldtuneError: A score is NaN or infinite (e.g. a diverged warm-up loss).
    """
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"spf.density: {density} is outside (0, 1]")
    if not scores:
        raise ConfigError("spf.target_modules: no targets to score")
    bad = [name for name, s in scores.items() if not torch.isfinite(s).all()]
    if bad:
        raise ShieldtuneError(f"SPF saliency scores of {', '.join(bad)} are NaN or infinite")
    device = next(iter(scores.values())).device
    flat = torch.cat([s.reshape(-1).float().to(device) for s in scores.values()])  # (N,)
    k = max(1, round(density * flat.numel()))
    kth = torch.topk(flat, k, sorted=False).values.min()  # () the k-th largest score
    keep = flat > kth  # (N,) strictly above the threshold
    need = k - int(keep.sum())
    ties = (flat == kth).nonzero().squeeze(1)[:need]  # (need,) first tied positions
    keep[ties] = True  # (N,) exactly k True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start : start + s.numel()].view(s.shape).to(s.device)
        start += s.numel()
    return masks


def _gradient_scores(
    params: dict[str, nn.Parameter], loss_fn: Callable[[int], Tensor], warmup_batches: int
) -> dict[str, Tensor]:
    """Sum |grad| of each target over the warm-up batches, leaving no ``.grad`` behind."""
    names = list(params)
    tensors = [params[n] for n in names]
    flags = [p.requires_grad for p in tensors]
    totals = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in tensors]
    try:
        for p in tensors:
            p.requires_grad_(True)
        with torch.enable_grad():
            for i in range(warmup_batches):
                loss = loss_fn(i)
                if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                    raise ShieldtuneError(
                        f"SPF warm-up batch {i}: loss_fn must return a differentiable scalar "
                        "tensor (is it computed under torch.no_grad()?)"
                    )
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                for total, grad in zip(totals, grads, strict=True):
                    if grad is not None:
                        total.add_(grad.detach().abs().float())
    finally:
        for p, flag in zip(tensors, flags, strict=True):
            p.requires_grad_(flag)
    return dict(zip(names, totals, strict=True))


def _owners(module: nn.Module) -> dict[int, list[str]]:
    """Parameter id -> every name it has in ``module`` (more than one when tied)."""
    owners: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    return owners


def _is_matmul(module: nn.Module, param_name: str) -> bool:
    """Whether the parameter is the ``weight`` of an ``nn.Linear`` or HF ``Conv1D``."""
    owner_name, _, attr = param_name.rpartition(".")
    owner = module.get_submodule(owner_name)
    return attr == "weight" and isinstance(owner, (nn.Linear, Conv1D))


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(
            f"spf.target_modules: {pattern!r} is not a valid regular expression ({err})"
        ) from None


def _matches(pattern: re.Pattern[str], name: str) -> bool:
    text = pattern.pattern
    return name == text or name.endswith("." + text) or pattern.fullmatch(name) is not None


def _some(module: nn.Module) -> str:
    names = [n for n, _ in module.named_parameters()]
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")
