"""timm models and their weights: a checkpoint loaded with one line naming every mismatch, the model a
checkpoint describes rebuilt (validate.py, `python -m we_timm.export`), pretrained weights checked before a
download is tried, and the checkpoints and models a bulk validation evaluates.

Every failure a user can cause raises `CheckpointError` (or ValueError, for pretrained weights) with a
one-line message, so CLIs can print it and exit non-zero.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch

from .checkpoint import listing, load_weights, resolve_weights_file, state_token
from .errors import CheckpointError

_logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- loading into a model


def model_name(model: torch.nn.Module) -> str:
    """timm architecture name if known (pretrained_cfg), else the class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def describe_mismatch(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> str:
    """'' if `state_dict` fits `model`, else 'missing keys [...]; unexpected [...]; shape mismatch ...'."""
    expected = model.state_dict()
    parts = []
    if strict:
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing:
            parts.append(f"missing keys {listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {listing(unexpected)}")
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if shapes:
        parts.append(f"shape mismatch {listing(shapes)[1:-1]}")
    return "; ".join(parts)


SPLIT_BN = ".aux_bn."  # keys of the extra BatchNorms of timm's SplitBatchNorm2d (--split-bn): training-only


def load_into_model(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """`model.load_state_dict` that fails with one `CheckpointError` line naming every mismatch.

    Shapes are checked even with `strict=False` (torch would raise anyway);
    checkpoint shapes are listed first, model shapes second.
    """
    own = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if k in own or SPLIT_BN not in k}  # --split-bn's extra BNs
    problem = describe_mismatch(model, state_dict, strict=strict)
    if problem:
        raise CheckpointError(f"checkpoint does not match model {model_name(model)}: {problem}")
    result = model.load_state_dict(state_dict, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        _logger.warning(
            "non-strict load into %s: missing %s; unexpected %s",
            model_name(model), listing(result.missing_keys), listing(result.unexpected_keys),
        )


# ----------------------------------------------------------------------------- pretrained weights


def check_pretrained_reachable(name: str, timeout: float = 5.0) -> None:
    """Before `timm.create_model(name, pretrained=True)`: ValueError in seconds (not a minute of retries) when
    the weights are neither cached nor downloadable (HF_HUB_OFFLINE set, or the hub / URL host unreachable)."""
    import socket
    from urllib.parse import urlparse

    import timm

    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    hub_id, url = (getattr(cfg, "hf_hub_id", None), getattr(cfg, "url", None)) if cfg is not None else (None, None)
    if getattr(cfg, "file", None) or getattr(cfg, "state_dict", None):
        return
    if hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str) for f in names):
            return
        if constants.HF_HUB_OFFLINE:
            raise ValueError(f"--pretrained {name}: its weights ({repo}) are not in the Hugging Face cache "
                             f"{constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is set; download them once online, "
                             "or pass --pretrained-path FILE")
        where = constants.ENDPOINT
    elif url:
        if os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))):
            return
        where = url
    else:
        return  # no weights to fetch: timm says so itself
    parsed = urlparse(where)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"--pretrained {name}: its weights are not cached and {host}:{port} cannot be reached "
                         f"({e.strerror or e}); connect, or pass --pretrained-path FILE") from None


# ----------------------------------------------------------------------------- model from a checkpoint


def _head_size(name: str, state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """Class count read off the classifier weight of a checkpoint without metadata (timm .pth)."""
    import timm

    cfg = timm.get_pretrained_cfg(name, allow_unregistered=True)
    head = cfg.classifier if cfg is not None else None
    weight = state_dict.get(f"{head}.weight") if isinstance(head, str) else None
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


def create_model_from_checkpoint(
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    use_ema: bool = False,
    **model_kwargs: Any,
) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """Build the timm model a checkpoint describes and load its weights: `(model, metadata, file)`.

    Architecture, class count and `model_kwargs` come from the metadata unless given
    (a metadata-free checkpoint's class count is read off its classifier weight).
    A mismatch (other architecture or class count) raises `CheckpointError` naming keys.
    """
    import timm

    path = resolve_weights_file(path, use_ema=use_ema)
    state_dict, metadata = load_weights(path, use_ema=use_ema)
    if use_ema and metadata.get("ema") is not True:
        raise CheckpointError(f"no EMA weights in {path}")
    name = model_name or metadata.get("architecture")
    if not name:
        raise CheckpointError(f"{path} does not record its architecture; pass the model name (--model)")
    if model_name and metadata.get("architecture") not in (None, model_name):
        _logger.warning("checkpoint %s was trained as %s, building %s", path, metadata["architecture"], model_name)
    if not timm.is_model(name):
        raise CheckpointError(f"unknown timm architecture {name!r} (checkpoint {path})")
    kwargs = {**(metadata.get("model_kwargs") or {}), **model_kwargs}
    classes = num_classes if num_classes is not None else metadata.get("num_classes", _head_size(name, state_dict))
    if classes is not None:
        kwargs["num_classes"] = int(classes)
    model = timm.create_model(name, pretrained=False, **kwargs)
    try:
        load_into_model(model, state_dict)
    except CheckpointError as e:
        saved = {k: metadata[k] for k in ("architecture", "num_classes") if k in metadata}
        hint = f" (the checkpoint records {', '.join(f'{k}={v}' for k, v in saved.items())})" if saved else ""
        raise CheckpointError(f"{path}: {e}{hint}") from None
    return model, metadata, path


# ----------------------------------------------------------------------------- bulk validation


WEIGHT_PATTERNS = ("*.safetensors", "*.pth.tar", "*.pth", "*.bin")


def checkpoint_files(folder: str | os.PathLike) -> list[str]:
    """The checkpoints of a folder, sorted: its `.safetensors` weights (`_ema` siblings excluded: --use-ema picks
    them) and the train.py training states whose weights none of them holds (a run's kept epochs), else its
    `.pth.tar` / `.pth` / `.bin` files (timm's run folders, a train.py run still in progress). train.py's files
    name the state they hold (`token`): each such state is listed once (`model_best.*` of the last epoch is
    `last.*`), and `recovery.pth.tar` (mid-epoch) is left out. CheckpointError if there are none."""
    import glob

    folder = os.fspath(folder)
    found = {pattern: sorted(glob.glob(os.path.join(folder, pattern))) for pattern in WEIGHT_PATTERNS}
    weights = [p for p in found["*.safetensors"] if not p.endswith("_ema.safetensors")]
    others = [p for pattern in WEIGHT_PATTERNS[1:] for p in found[pattern] if os.path.basename(p) != "recovery.pth.tar"]
    chosen, listed = [], set()
    for path in [*weights, *others]:
        token = state_token(path)
        if token is None and weights and path not in weights:  # beside release files: only train.py's states
            continue
        if token is None or token not in listed:
            chosen.append(path)
            listed.add(token)
    if not chosen:
        raise CheckpointError(f"no checkpoints in {folder} ({', '.join(WEIGHT_PATTERNS)})")
    return sorted(chosen)


def weights_cached(name: str) -> bool:
    """Whether timm's pretrained weights of `name` are on this machine (Hugging Face cache or a local file)."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return False
    if cfg.file:
        return os.path.isfile(cfg.file)
    return bool(cfg.hf_hub_id) and any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str)
                                       for f in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"))


def local_models(spec: str) -> list[str]:
    """`--model a,b` or a wildcard (`resnet*`): the named models, and those of each wildcard whose pretrained
    weights are cached here (nothing is downloaded)."""
    import timm

    names: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if any(c in part for c in "*?["):
            names += [n for n in timm.list_models(part, pretrained=True) if weights_cached(n)]
        else:
            names.append(part)
    return list(dict.fromkeys(names))
