"""Model checkpoints: atomic safetensors writes with JSON metadata, tolerant reads.

`save_safetensors` / `load_weights` are the release format of `train.py`: a
`.safetensors` file whose str->str header holds JSON-encoded metadata
(architecture, num_classes, data_config, WE config, epoch, metrics, args, ema).
`load_weights` also reads timm training checkpoints (`.pth`, `.pth.tar`, `.bin`)
through `torch.load(weights_only=True)`, unwrapped like timm's `load_state_dict`.

`resolve_weights_file` finds the file of the requested weights (train.py's `_ema` siblings); `state_token`
names the training state a file holds. Building a model from a checkpoint is `models`'.

Every failure a user can cause (missing file, directory, not a checkpoint,
truncated or corrupt file, wrong architecture) raises `CheckpointError` whose
message is one line naming the path, so CLIs can print it and exit non-zero.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
from typing import Any, Mapping

import torch

from .errors import CheckpointError, one_line
from .files import atomic_write

_logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "atomic_save",
    "ema_sibling",
    "is_safetensors_file",
    "listing",
    "load_weights",
    "read_metadata",
    "resolve_weights_file",
    "save_safetensors",
    "state_token",
    "torch_load",
]

# timm's training checkpoints nest the weights under one of these keys (timm `load_state_dict`).
_EMA_KEYS = ("state_dict_ema", "model_ema")
_PLAIN_KEYS = ("state_dict", "model")
_MAX_LISTED = 8  # keys named in a mismatch message before "... (+N more)"


def _detail(e: BaseException, limit: int = 160) -> str:
    """First sentence of an underlying error, on one line, at most `limit` characters."""
    text = one_line(e) or type(e).__name__
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."

def listing(keys: list[str]) -> str:
    """`[a, b, ... (+N more)]`: at most `_MAX_LISTED` names, for one-line messages."""
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


# ----------------------------------------------------------------------------- writing


def _dealias(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing storage (safetensors refuses tied/aliased tensors).

    Tied weights (e.g. an embedding reused as a head) are cloned so every key keeps
    its own copy and the file loads back with `strict=True`.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor")
        t = t.detach().contiguous()
        ptr = (str(t.device), t.untyped_storage().data_ptr())
        if ptr in seen and t.numel() > 0:
            t = t.clone()
            ptr = (str(t.device), t.untyped_storage().data_ptr())
        seen.add(ptr)
        out[name] = t
    return out


def encode_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """JSON-encode every value for the safetensors str->str header."""
    out = {}
    for key, value in (metadata or {}).items():
        try:
            out[str(key)] = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint metadata {key!r} is not JSON-serialisable: {e}") from e
    return out


def decode_metadata(header: Mapping[str, str] | None) -> dict[str, Any]:
    """Inverse of `encode_metadata`; values that are not JSON (foreign files) stay strings."""
    out = {}
    for key, value in (header or {}).items():
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def save_safetensors(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> None:
    """Atomically write `state_dict` as safetensors with JSON-encoded `metadata` values."""
    from safetensors.torch import save_file

    tensors = _dealias(state_dict)
    header = encode_metadata(metadata)
    _check_parent(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` through a temp file + fsync + `os.replace`, without the zip records' CRC32.

    `torch.load` never checks those checksums (a flipped byte inside a tensor loads silently either way), and
    computing them is about a quarter of the time `torch.save` takes; a truncated file is still refused.
    """
    _check_parent(path)
    atomic_write(path, lambda tmp: _save_without_crc(obj, tmp))


def _save_without_crc(obj: Any, path: str) -> None:
    get, set_ = (getattr(torch.serialization, f"{k}_crc32_options", None) for k in ("get", "set"))
    if get is None or set_ is None:  # torch < 2.6 always computes them
        torch.save(obj, path)
        return
    before = get()
    set_(False)
    try:
        torch.save(obj, path)
    finally:
        set_(before)


def _check_parent(path: str | os.PathLike) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CheckpointError(f"cannot save {os.fspath(path)}: directory {parent} does not exist")


# ----------------------------------------------------------------------------- reading


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """True if the file starts like safetensors: an 8-byte little-endian length, then `{`."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= os.path.getsize(path) - 8


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint is a directory, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Decoded metadata of a safetensors file (header only; no tensors read)."""
    from safetensors import safe_open

    path = os.fspath(path)
    _check_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            return decode_metadata(f.metadata())
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"corrupt, truncated or not a safetensors checkpoint: {path} ({_detail(e)})") from e


def _load_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    try:
        state_dict = load_file(path, device="cpu")
    except Exception as e:
        raise CheckpointError(f"corrupt or truncated safetensors checkpoint: {path} ({_detail(e)})") from e
    return state_dict, metadata


def _magic(path: str) -> bytes:
    """The first 4 bytes of a file: PK\\x03\\x04 for torch.save's zip archives."""
    with open(path, "rb") as f:
        return f.read(4)


def torch_load(path: str | os.PathLike, mmap: bool = False) -> Any:
    """The one `torch.load` of the recipes: `weights_only=True` on CPU (`mmap` reads lazily); CheckpointError
    naming the path for anything that is not a clean PyTorch file of tensors and plain values."""
    path = os.fspath(path)
    _check_file(path)
    magic = _magic(path)
    # torch.save writes a zip archive (PK\x03\x04); legacy files start with a pickle protocol byte.
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise CheckpointError(f"not a checkpoint: {path} is neither safetensors nor a PyTorch file")
    try:
        # timm training checkpoints store `args` as an argparse.Namespace (timm `_torch_load`).
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and magic == b"PK\x03\x04")
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CheckpointError(f"corrupt or truncated PyTorch checkpoint: {path} ({_detail(e)})") from e
        try:  # zip checkpoints only; legacy or truncated files cannot be scanned
            unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "unknown"
        except Exception:
            unsafe = "unknown; the file may also be truncated"
        raise CheckpointError(f"refusing to unpickle {path}: it holds objects other than tensors ({unsafe}); weights_only=True") from e
    except Exception as e:
        raise CheckpointError(f"corrupt or truncated PyTorch checkpoint: {path} ({_detail(e)})") from e


def _clean_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Strip DDP `module.` and torch.compile `_orig_mod.` prefixes (timm `clean_state_dict`)."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _torch_metadata(ckpt: Mapping[str, Any], key: str) -> dict[str, Any]:
    """What a timm training checkpoint tells about itself, in our metadata's names."""
    meta: dict[str, Any] = {"format": "torch", "ema": key in _EMA_KEYS}
    if isinstance(ckpt.get("arch"), str):
        meta["architecture"] = ckpt["arch"]
    if isinstance(ckpt.get("epoch"), int):
        meta["epoch"] = ckpt["epoch"]
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if isinstance(args, dict):
        meta["args"] = args
        if isinstance(args.get("num_classes"), int):
            meta["num_classes"] = args["num_classes"]
        if isinstance(args.get("model"), str):  # train.py's training state has no `arch`
            meta.setdefault("architecture", args["model"])
        # create_model kwargs as timm's and our train.py build them from these args (img_size aside)
        kwargs = {key: args[flag] for flag, key in (("in_chans", "in_chans"), ("gp", "global_pool"),
                  ("bn_momentum", "bn_momentum"), ("bn_eps", "bn_eps")) if args.get(flag) is not None}
        kwargs.update(args["model_kwargs"] if isinstance(args.get("model_kwargs"), dict) else {})
        if kwargs:
            meta["model_kwargs"] = kwargs
    for key in ("architecture", "num_classes", "model_kwargs", "data_config", "we_config"):  # train.py's states
        if ckpt.get(key) is not None:
            meta[key] = ckpt[key]
    return meta


def _unwrap(ckpt: Any, path: str, use_ema: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"not a model checkpoint: {path} holds a {type(ckpt).__name__}, not a state_dict")
    key = ""
    if use_ema:
        key = next((k for k in _EMA_KEYS if ckpt.get(k) is not None), "")
    if not key:
        key = next((k for k in _PLAIN_KEYS if isinstance(ckpt.get(k), Mapping)), "")
    if use_ema and key not in _EMA_KEYS:
        _logger.warning("no EMA weights in %s; using its %s", path, key or "top-level state_dict")
    state_dict = ckpt[key] if key else ckpt
    meta = _torch_metadata(ckpt, key) if key else {"format": "torch", "ema": False}
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointError(f"not a model checkpoint: {path} has no weights")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"not a model checkpoint: {path} has non-tensor entries {listing(bad)}")
    return _clean_keys(state_dict), meta


def load_weights(path: str | os.PathLike, *, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read `(state_dict, metadata)` from a safetensors or timm/PyTorch checkpoint on CPU.

    safetensors is detected by extension or by content; its metadata values are
    JSON-decoded. Other files go through `torch.load(weights_only=True)` and are
    unwrapped from `state_dict_ema`/`model_ema` (with `use_ema`), `state_dict` or
    `model`; their metadata is what the file says about itself (architecture,
    epoch, args). `module.`/`_orig_mod.` prefixes are stripped.
    """
    path = os.fspath(path)
    _check_file(path)
    if path.endswith(".safetensors") or is_safetensors_file(path):
        state_dict, metadata = _load_safetensors(path)
        if not state_dict:
            raise CheckpointError(f"not a model checkpoint: {path} holds no tensors")
        return _clean_keys(state_dict), metadata
    return _unwrap(torch_load(path), path, use_ema)


def ema_sibling(path: str | os.PathLike) -> str:
    """`run/model_best.safetensors` -> `run/model_best_ema.safetensors` (train.py's EMA naming)."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}_ema{ext}"



def resolve_weights_file(path: str | os.PathLike, *, use_ema: bool = False) -> str:
    """The file holding the requested weights: `path`, or its `_ema` sibling for `use_ema`.

    train.py releases EMA weights as `<name>_ema.safetensors` (metadata `ema=true`);
    a timm `.pth` keeps them inside the same file (`state_dict_ema`).
    """
    path = os.fspath(path)
    _check_file(path)
    if not use_ema or not (path.endswith(".safetensors") or is_safetensors_file(path)):
        return path
    if read_metadata(path).get("ema") is True:
        return path
    sibling = ema_sibling(path)
    if not os.path.isfile(sibling):
        raise CheckpointError(f"no EMA weights for {path}: it is not an EMA checkpoint and {sibling} does not exist")
    return sibling


def state_token(path: str) -> str | None:
    """The training-state token of a train.py release file or training state (None: missing, unreadable, or
    another kind of file)."""
    try:
        if path.endswith(".safetensors"):
            token = read_metadata(path).get("token")
        elif path.endswith(".pth.tar") and _magic(path) == b"PK\x03\x04":  # train.py's states are zip files
            saved = torch_load(path, mmap=True)
            token = saved.get("token") if isinstance(saved, dict) else None
        else:
            return None
    except (CheckpointError, OSError):
        return None
    return token if isinstance(token, str) else None
