"""Export a train.py checkpoint as a Hugging Face Hub / timm model folder.

    python -m we_timm.export --checkpoint output/run/model_best.safetensors --output-dir release/

writes `release/config.json` (timm's hub format: `architecture`, `num_classes`,
`num_features`, `model_args`, `pretrained_cfg` with the evaluation data config)
and `release/model.safetensors`. Both load offline with plain timm:

    timm.create_model("local-dir:release", pretrained=True)
    timm.create_model(arch, pretrained=True, num_classes=n,
                      pretrained_cfg_overlay=dict(file="release/model.safetensors", num_classes=n))

(timm compares the class count to `pretrained_cfg["num_classes"]` and drops a
head that disagrees, hence `num_classes` in the overlay for non-ImageNet heads.)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import torch

from .args import ArgumentParser
from .checkpoint import save_safetensors
from .models import create_model_from_checkpoint
from .errors import CheckpointError, one_line_errors, run
from .files import atomic_write

_logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"  # timm/HF hub names (timm.models._hub)
WEIGHTS_NAME = "model.safetensors"
_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def export_model(
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    *,
    data_config: dict[str, Any] | None = None,
    model_args: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """Write `config.json` + `model.safetensors` for `model` into `output_dir`; returns both paths.

    `data_config` (timm `resolve_data_config` keys) becomes the folder's
    `pretrained_cfg`, so timm's `resolve_data_config(model=...)` on the loaded
    model reproduces the evaluation transform. `metadata` (train.py's) is kept
    under the `we_timm` key of config.json for provenance.
    """
    from timm.models._hub import save_config_for_hf

    output_dir = os.fspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise CheckpointError(f"output dir {output_dir} exists and is not a directory")
    os.makedirs(output_dir, exist_ok=True)
    data = {k: v for k, v in (data_config or {}).items() if k in _DATA_KEYS and v is not None}
    # The source cfg's tag (e.g. `r160_in1k`) would misdescribe these weights.
    extra: dict[str, Any] = {"pretrained_cfg": {"tag": "we_timm"}}
    if metadata:
        extra["we_timm"] = _provenance(metadata)
    config_path = os.path.join(output_dir, CONFIG_NAME)
    weights_path = os.path.join(output_dir, WEIGHTS_NAME)
    # `format: pt` is what HF tooling expects in a hub safetensors header.
    save_safetensors(weights_path, model.state_dict(), {"format": "pt"})
    atomic_write(config_path, lambda tmp: save_config_for_hf(
        model, tmp, model_config=extra, model_args=model_args or None, data_config=data or None,
    ))
    return config_path, weights_path


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Before any work: `output_dir` is a folder (or can be made) and holds no export unless `overwrite`."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise CheckpointError(f"--output-dir {output_dir} exists and is not a directory")
    taken = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if os.path.exists(os.path.join(output_dir, n))]
    if taken and not overwrite:
        raise CheckpointError(f"--output-dir {output_dir} already holds an export ({', '.join(taken)}); "
                              "pass --overwrite to replace it, or choose another folder")


def _provenance(metadata: dict[str, Any]) -> dict[str, Any]:
    """The train.py metadata worth keeping in config.json (JSON-safe)."""
    keep = ("epoch", "metrics", "we_config", "ema", "data_config")
    return json.loads(json.dumps({k: metadata[k] for k in keep if k in metadata}, default=str))


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m we_timm.export",
                            description="Export a we_timm checkpoint as a timm / HF hub folder")
    parser.add_argument("--checkpoint", required=True, help="train.py .safetensors (or a timm .pth/.pth.tar) checkpoint")
    parser.add_argument("--output-dir", required=True, help="folder to write config.json and model.safetensors into")
    parser.add_argument("--model", default=None, help="timm architecture; default: the checkpoint's metadata")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size; default: the checkpoint's metadata")
    parser.add_argument("--use-ema", action="store_true", help="export the EMA weights (<name>_ema.safetensors or state_dict_ema)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the config.json / model.safetensors of an existing export in --output-dir")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser


def main(args: argparse.Namespace) -> tuple[str, str]:
    """Export `args.checkpoint`; bad inputs become `SystemExit("error: <one line>")` unless `--debug`."""
    with one_line_errors(args.debug):
        check_output_dir(args.output_dir, args.overwrite)
        model, metadata, path = create_model_from_checkpoint(
            args.checkpoint, model_name=args.model, num_classes=args.num_classes, use_ema=args.use_ema,
        )
        data_config = metadata.get("data_config") or {}
        # timm records create_model's kwargs on the model (`_model_args`); they become `model_args`.
        paths = export_model(model, args.output_dir, data_config=data_config, metadata=metadata)
    _logger.info("exported %s (%s) to %s", path, model.pretrained_cfg.get("architecture"), args.output_dir)
    return paths


def cli(argv: list[str] | None = None) -> int:
    """Entry point (`python -m we_timm.export`, `we-export`)."""
    if not logging.root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return run(lambda a: main(get_args_parser().parse_args(a)), argv)
