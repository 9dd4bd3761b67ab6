"""`-c FILE`: a YAML file of train.py's argument defaults, typed as on the command line.

Keys are argument names (`batch_size` or `batch-size`). A key given twice, an unknown key or an ill-typed
value is a one-line ValueError; a key of timm's own train.py that we_timm does not implement is skipped
with one warning, so that a timm run's args.yaml is a valid `-c`.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Mapping

import yaml

from .errors import one_line

_logger = logging.getLogger(__name__)

# Arguments of timm's train.py (1.0.29) that we_timm does not implement: in a `-c` YAML (e.g. the args.yaml
# of a timm run) they are skipped with one warning; any other unknown key is an error.
TIMM_ONLY = frozenset("""
    data dataset_trust_remote_code device
    device_modules distill_loss_weight drop_connect epoch_repeats fuser
    input_img_mode input_key kd_distill_type kd_loss_type kd_model_name
    kd_student_feature_dim kd_teacher_feature_dim kd_temperature kd_token_distill_type layer_decay_min_scale
    layer_decay_no_opt_scale local_rank log_wandb lr_cycle_decay lr_cycle_limit lr_cycle_mul lr_k_decay lr_noise
    lr_noise_pct lr_noise_std model_ema_force_cpu naflex_loader naflex_loss_scale naflex_max_seq_len
    naflex_patch_size_probs naflex_patch_sizes naflex_patchify_channels_first naflex_train_seq_lens no_ddp_bb
    save_images synchronize_step target_key task_loss_weight
    torchscript train_batch_sizes train_batches_per_epoch train_img_sizes train_size_probs
    train_size_random_mix train_size_schedule train_size_schedule_spread tta use_multi_epochs_loader val_interval
    variable_batch_loss_scale wandb_project wandb_resume_id wandb_tags
""".split())


def _coerce(action: argparse.Action, key: str, value: Any) -> Any:
    """A YAML value as argparse would have produced it from the command line (ValueError if it cannot)."""
    if value is None:
        if action.default is not None:
            raise ValueError(f"{key}: null is not a value (leave the key out for the default, "
                             f"{action.default!r})")
        return None
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(action.default, dict):  # key=value actions such as timm ParseKwargs
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise ValueError(f"{key}: expected {action.nargs} values, got {value!r}")
        return [_coerce_one(action, key, v) for v in items]
    return _coerce_one(action, key, value)


def _coerce_one(action: argparse.Action, key: str, value: Any) -> Any:
    kind = action.type
    if kind is not None and not (kind is int and isinstance(value, bool)):
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: invalid {getattr(kind, '__name__', 'value')} {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{key}: {value!r} is not one of {list(action.choices)}")
    return value


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """YAML file -> validated parser defaults; unknown keys and ill-typed values raise ValueError."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.load(f, Loader=UniqueKeyLoader)
    except OSError as e:
        raise ValueError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config {path} is not valid YAML: {one_line(e)}") from None
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path} must be a mapping of argument names to values")
    return config_defaults(parser, cfg, f"config {path}")


def config_defaults(parser: argparse.ArgumentParser, cfg: Mapping[str, Any], source: str,
                    strict: bool = True) -> dict[str, Any]:
    """`{dest: value}` for `parser.set_defaults`, values typed as on the command line.

    Unknown keys raise ValueError naming `source` (with `strict=False` they are
    logged and skipped, e.g. arguments saved by an older train.py).
    A key of timm's train.py that we_timm does not implement (`TIMM_ONLY`: timm's own args.yaml is a valid
    `-c`) is skipped, all of them named in one warning.
    """
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    keys = {str(k): str(k).replace("-", "_") for k in cfg}
    unknown = sorted(k for k, dest in keys.items() if dest not in actions)
    timm_only = [k for k in unknown if keys[k] in TIMM_ONLY]
    if timm_only:
        _logger.warning("%s: ignoring %d argument(s) of timm's train.py that we_timm does not implement: %s",
                        source, len(timm_only), ", ".join(timm_only))
    unknown = [k for k in unknown if k not in timm_only]
    if unknown and strict:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)} (keys are the argument names, e.g. batch_size)")
    if unknown:
        _logger.warning("%s: ignoring unknown argument(s) %s", source, ", ".join(unknown))
    try:
        return {keys[str(k)]: _coerce(actions[keys[str(k)]], str(k), v) for k, v in cfg.items()
                if keys[str(k)] in actions}
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
