"""validate.py's command line (timm validate.py's flags where they exist; defaults from the checkpoint)."""
from __future__ import annotations

import argparse
import os

from timm import utils

from .args import ArgumentParser
from .bad_images import DEFAULT_MAX_BAD_IMAGES

DEFAULT_EVAL_BATCH_SIZE = 256  # timm validate.py's default


def get_validate_parser() -> argparse.ArgumentParser:
    """validate.py's parser, unparsed."""
    parser = ArgumentParser(prog="validate.py", description="Validate a we_timm / timm checkpoint")
    group = parser.add_argument_group("Model")
    group.add_argument("--model", "-m", default=None, help="timm architecture (default: the checkpoint's metadata); "
                       "a list a,b or a wildcard (resnet*) evaluates each model whose pretrained weights are local")
    group.add_argument("--checkpoint", default="", help=".safetensors (train.py) or timm .pth/.pth.tar weights; "
                       "a folder evaluates each of its checkpoints (one results row each)")
    group.add_argument("--pretrained", action="store_true", help="no checkpoint: use timm's pretrained weights (needs a cache)")
    group.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights (<name>_ema.safetensors or state_dict_ema)")
    group.add_argument("--num-classes", type=int, default=None, help="classifier size; default: the checkpoint's metadata")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=utils.ParseKwargs,
                       help="extra create_model kwargs, key=value (over the checkpoint's)")
    group.add_argument("--reparam", action="store_true", help="reparameterize the model (timm's reparameterize_model)")
    group.add_argument("--test-pool", action="store_true", help="test-time pooling (timm's apply_test_time_pool)")

    group = parser.add_argument_group("Data")
    group.add_argument("--data-dir", default=None, help="image folder root (timm ImageFolder layout, split sub-folders searched)")
    group.add_argument("--dataset", default="", help="'' for an image folder, 'digits' for sklearn digits, or a timm dataset name; default: the checkpoint's training data")
    group.add_argument("--split", default="validation", help="dataset split to evaluate")
    group.add_argument("--img-size", type=int, default=None, help="square input size; default: checkpoint data config")
    group.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"), help="full input size, overrides --img-size")
    group.add_argument("--use-train-size", action="store_true",
                       help="the model's train input size, not its test size (timm's use_test_size=False)")
    group.add_argument("--crop-pct", type=float, default=None, help="center-crop fraction; default: checkpoint data config")
    group.add_argument("--crop-mode", default=None, help="crop mode (center, squash, border); default: checkpoint data config")
    group.add_argument("--interpolation", default=None, help="resize interpolation; default: checkpoint data config")
    group.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN", help="normalisation mean")
    group.add_argument("--std", type=float, nargs="+", default=None, metavar="STD", help="normalisation std")
    group.add_argument("--num-samples", type=int, default=None, metavar="N", help="evaluate only the first N samples (train.py's --val-num-samples)")
    group.add_argument("--class-map", default="", help="class to index mapping file for image folders")
    group.add_argument("--max-bad-images", type=int, default=DEFAULT_MAX_BAD_IMAGES, metavar="N",
                       help="unreadable images (skipped, named in a warning; timm reads the next image in their place) "
                            f"tolerated before the evaluation stops; the result's bad_images counts them "
                            f"(default: {DEFAULT_MAX_BAD_IMAGES})")
    group.add_argument("--batch-size", "-b", type=int, default=None, help=f"images per process and step; default: the checkpoint's eval batch size, else {DEFAULT_EVAL_BATCH_SIZE}")
    group.add_argument("--workers", "-j", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes per process (default: min(4, CPUs))")

    group = parser.add_argument_group("Runtime")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="autocast the forward pass; default: as the checkpoint was trained")
    group.add_argument("--amp-dtype", default=None, choices=("bfloat16", "float16"), help="autocast dtype with --amp; default: the checkpoint's, else bfloat16")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="NHWC memory format; default: as the checkpoint was trained")
    group.add_argument("--prefetcher", action=argparse.BooleanOptionalAction, default=None,
                       help="uint8 images normalised on the device (timm's prefetcher); default: as the checkpoint "
                            "was trained (--no-prefetcher: normalised by the workers)")
    group.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=None,
                       help="pin batches in CPU memory for asynchronous copies to the device (default: on with CUDA)")
    group.add_argument("--cpu", action="store_true", help="run on CPU even if an accelerator is present")
    group.add_argument("--results-file", default="", help="write the results row to this file")
    group.add_argument("--results-format", default="csv", choices=("csv", "json"), help="format of --results-file")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--debug", action="store_true", help="raise with a traceback instead of a one-line error")
    return parser
