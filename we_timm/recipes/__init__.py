"""The recipes layer: what train.py, validate.py and the tools share. Needs timm, Accelerate and friends;
the WE core (`we_timm`) never imports it.

    args          train.py's parser; defaults read in order: CLI > -c YAML > --resume state
    args_checks   train.py's arguments checked before any work; derived defaults, WEConfig
    args_yaml     -c YAML: typed like the CLI, unknown keys an error, timm's own keys one warning
    args_validate validate.py's parser
    dataset       digits + timm datasets, probed; image-folder layout and class checks
    sampling      seeded sample order and augmentation (persistent workers, exact resume)
    bad_images    unreadable images named, counted across workers, limited
    data          what the scripts load: datasets wrapped, timm transforms and loaders
    engine        Trainer, train_one_epoch, evaluate
    runtime       process and Accelerate setup: steady malloc, CUDA flags, step kernel, precision, setups refused
    evolve        the WE step of a run (EMA, optimizer state) and its cross-rank check
    state         training states: what a run saves (epoch, mid-epoch, release files) and restores
    resuming      reading states; --resume auto / a folder -> the newest state; resume checks
    keeper        which epochs are kept (timm's CheckpointSaver policy); a folder's links repaired
    shards        FSDP2: whole model / optimizer states gathered in the unsharded layout, and back
    checkpoint    weight files: safetensors + metadata (atomic), timm .pth reads
    models        model from a checkpoint, loads naming every mismatch; bulk validation's lists
    files         atomic writes, summary.csv, we_stats.jsonl, plots
    errors        exception types, one-line `error:` reporting, the scripts' fast exit
    export        checkpoint -> timm / HF hub folder
    inspect       dry-run WE on a checkpoint: CSV, PNG, table (`--we-inspect-every` in train.py)

Modules are imported by name (`from we_timm.recipes import state`); importing this package loads nothing.
"""
