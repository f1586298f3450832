"""Tiny-model test helpers shared by the test modules (import as ``from _tiny import ...``)."""

from __future__ import annotations

import torch

# (preset, task) pairs every tiny family supports
TINY_CASES = [
    ("tiny-llama", "causal-lm"),
    ("tiny-llama", "seq-cls"),
    ("tiny-qwen2", "causal-lm"),
    ("tiny-qwen2", "seq-cls"),
    ("tiny-gpt2", "causal-lm"),
    ("tiny-gpt2", "seq-cls"),
    ("tiny-bert", "seq-cls"),
]


def padded_batch(batch: int = 3, seq: int = 12, vocab: tuple[int, int] = (4, 200), seed: int = 0):
    """Random token ids with right padding of different lengths in each row (pad id 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab[0], vocab[1], (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        mask[row, seq - 3 * row :] = 0
    ids[mask == 0] = 0
    return ids, mask


def write_keyword_table(path, rows: int = 96):
    """A two-class CSV a tiny random model can learn: the class is the first word."""
    lines = ["text,label"]
    gen = torch.Generator().manual_seed(0)
    words = ["fever", "cough", "rash", "pain", "nausea", "fatigue"]
    for i in range(rows):
        label = i % 2
        filler = " ".join(words[j] for j in torch.randint(0, 6, (4,), generator=gen).tolist())
        lines.append(f"{'zzz' if label else 'aaa'} {filler},{label}")
    path.write_text("\n".join(lines))
    return path


def table_overrides(table) -> list[str]:
    """Config overrides that point a run at a table written by :func:`write_keyword_table`."""
    return ["data.dataset=table", f"data.path={table}", "data.text=text", "data.label=label"]
