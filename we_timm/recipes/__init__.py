"""The recipes layer: what train.py, validate.py and the tools share. Needs timm, Accelerate and friends;
the WE core (`we_timm`) never imports it.

    args        train.py's parser, `-c` YAML, resume defaults, checks before any work
    data        digits and timm datasets, probed; train and eval loaders
    engine      Trainer, train_one_epoch, evaluate, the WE step and its cross-rank check
    state       training state, checkpoint keeping, resume
    checkpoint  weight files: safetensors with metadata, timm .pth reads, model from a checkpoint
    files       atomic writes, summary.csv, we_stats.jsonl, plots
    errors      exception types and one-line `error:` reporting
    export      checkpoint -> timm / HF hub folder (`python -m we_timm.export`)
    inspect     dry-run WE on a checkpoint: CSV, PNG, table (`python -m we_timm.inspect`, --we-inspect-every)

Modules are imported by name (`from we_timm.recipes import state`); importing this package loads nothing.
"""
