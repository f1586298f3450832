"""Attention masks and position ids shared by both slices of a split model.

Both sides of a split rebuild the same masks from the (B, T) padding mask that travels with the
hidden states, so the front and back slices never disagree about what a token may attend to.
Masks are additive floats (0 = attend, dtype-min = blocked), which the eager and SDPA attention
implementations of transformers both accept.
"""

from __future__ import annotations

import torch

__all__ = ["additive_mask", "position_ids", "last_token_index"]


def additive_mask(
    attention_mask: torch.Tensor, *, causal: bool, prefix_len: int, dtype: torch.dtype
) -> torch.Tensor:
    """Build the (B, 1, T, P+T) additive attention mask.

    Args:
        attention_mask: (B, T) with 1 for real tokens, 0 for padding.
        causal: Whether a token may only attend to earlier positions (decoders).
        prefix_len: P, the number of trainable prefix positions in front (always visible).
        dtype: Float dtype of the attention scores.

    Returns:
        (B, 1, T, P+T) tensor: 0 where attention is allowed, the dtype's minimum where blocked.
    """
    bsz, seq = attention_mask.shape
    keep_tokens = attention_mask.bool()  # (B, T)
    keep_prefix = torch.ones(bsz, prefix_len, dtype=torch.bool, device=attention_mask.device)
    keep = torch.cat([keep_prefix, keep_tokens], dim=1)[:, None, None, :]  # (B, 1, 1, P+T)
    if causal:
        q_pos = torch.arange(seq, device=attention_mask.device)[:, None]  # (T, 1)
        k_pos = torch.arange(prefix_len + seq, device=attention_mask.device)[None, :] - prefix_len
        keep = keep & (k_pos <= q_pos)[None, None]  # (B, 1, T, P+T)
    else:
        keep = keep.expand(bsz, 1, seq, prefix_len + seq)  # (B, 1, T, P+T)
    mask = torch.zeros(keep.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~keep, torch.finfo(dtype).min)  # (B, 1, T, P+T)


def position_ids(attention_mask: torch.Tensor, *, prefix_len: int) -> torch.Tensor:
    """Position ids as transformers computes them: ``P + arange(T)`` (PEFT's prefix convention).

    Args:
        attention_mask: (B, T) padding mask (right padding).
        prefix_len: P, the number of prefix positions before the tokens.

    Returns:
        (1, T) int64 position ids.
    """
    seq = attention_mask.shape[1]
    return (torch.arange(seq, device=attention_mask.device) + prefix_len)[None, :]  # (1, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (right padding), as HF sequence heads pool.

    Args:
        attention_mask: (B, T) padding mask.

    Returns:
        (B,) int64 indices.
    """
    seq = attention_mask.shape[1]
    idx = torch.arange(seq, device=attention_mask.device)  # (T,)
    return (idx * attention_mask.long()).argmax(-1)  # (B,)
