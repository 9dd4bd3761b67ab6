"""train.py with one injected fault, for the reliability tests (never used in production).

    python tests/fault_runner.py --fault ACTION:POINT:EPOCH[:RANK] <train.py arguments>

ACTION `kill` sends SIGKILL to this process at POINT of epoch EPOCH (every rank, or only RANK):
    train        after the 2nd optimizer update of the epoch
    eval         after the first validation batch
    checkpoint   half-way through writing last.pth.tar (a partial temp file left)
    we           right after the weight-evolution step changed the parameters in memory
    save@K       before the K-th file operation (0-based) from the epoch's checkpoint save on: the state write,
                 the links (checkpoint-N.pth.tar, model_best.pth.tar), the removal of an evicted file, and, in
                 the last epoch, the release files' writes and links; not killed if there are K operations or
                 fewer (the run then completes)
ACTION `stop` sends SIGSTOP instead: the process stalls without dying, as a hung rank does; `term` sends SIGTERM.
ACTION `nan` makes the loss NaN from the 2nd training batch of EPOCH on (POINT must be `train`).
ACTION `nanweight` writes a NaN into the model's first parameter after the last update of EPOCH (POINT `train`):
the training loss stays finite, the validation loss does not.
The faults patch train.py's and the recipes' functions from outside, so train.py runs its own unmodified code.
"""
from __future__ import annotations

import os
import signal
import sys

import torch

import train
from we_timm.evolution import WeightEvolution
from we_timm.recipes import engine, files, keeper, state

POINTS = ("train", "eval", "checkpoint", "we", "save")
ACTION = "kill"


SIGNAL = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), SIGNAL[ACTION])


def install(spec: str) -> None:
    global ACTION
    action, point, epoch, *rank = spec.split(":")
    epoch, ACTION = int(epoch), action
    point, _, save_op = point.partition("@")
    assert action in ("kill", "stop", "term", "nan", "nanweight") and point in POINTS, spec
    assert action not in ("nan", "nanweight") or point == "train", spec
    if rank and int(os.environ.get("RANK", "0")) != int(rank[0]):
        return
    now = {"epoch": -1, "updates": 0}

    one_epoch = train.train_one_epoch

    def train_one_epoch(e, t, loader, resume=None):
        now.update(epoch=e, updates=0)
        return one_epoch(e, t, loader, resume)

    train.train_one_epoch = train_one_epoch

    if action == "nan":
        build_loss = train.build_loss

        def build_nan_loss(args, num_classes):
            loss_fn, mixup_fn = build_loss(args, num_classes)
            forward, calls = loss_fn.forward, {"n": 0}

            def nan_forward(*a, **k):
                loss = forward(*a, **k)
                calls["n"] += now["epoch"] == epoch
                return loss * float("nan") if calls["n"] >= 2 else loss

            loss_fn.forward = nan_forward
            return loss_fn, mixup_fn

        train.build_loss = build_nan_loss
    elif point == "train":  # kill / stop after the 2nd update; nanweight after the epoch's last
        step = engine.optimizer_step

        def optimizer_step(t):
            step(t)
            now["updates"] += 1
            if now["epoch"] != epoch:
                return
            if action == "nanweight" and now["updates"] == t.updates_per_epoch:
                with torch.no_grad():
                    next(t.raw_model.parameters()).view(-1)[0] = float("nan")
            elif action != "nanweight" and now["updates"] == 2:
                _die()

        engine.optimizer_step = optimizer_step
    elif point == "eval":
        evaluate = train.evaluate

        class killing:  # the loader, but the process dies when the 2nd batch is asked for
            def __init__(self, loader):
                self.loader = loader

            def __len__(self):
                return len(self.loader)

            def __iter__(self):
                for i, batch in enumerate(self.loader):
                    if i == 1:
                        _die()
                    yield batch

        def evaluate_then_die(model, loader, acc, **kwargs):
            return evaluate(model, killing(loader) if now["epoch"] == epoch else loader, acc, **kwargs)

        train.evaluate = evaluate_then_die
    elif point == "checkpoint":
        atomic_save = keeper.atomic_save

        def partial_save(obj, path):
            if now["epoch"] == epoch and str(path).endswith("last.pth.tar"):
                tmp = files.create_temp(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
                with open(tmp, "wb") as f:
                    f.write(b"PK\x03\x04 half a training state")
                    f.flush()
                    os.fsync(f.fileno())
                _die()
            atomic_save(obj, path)

        keeper.atomic_save = partial_save  # CheckpointKeeper.save writes last.pth.tar
    elif point == "save":  # the file operations of checkpoint keeping and release files, in the order made
        ops = {"n": 0}

        def counted(operation):
            def op(*a, **k):
                if now["epoch"] == epoch:
                    if ops["n"] == int(save_op):
                        _die()
                    ops["n"] += 1
                return operation(*a, **k)
            return op

        for module in (keeper, state):
            for name in ("save_safetensors", "atomic_save", "link_or_copy", "remove"):
                if hasattr(module, name):
                    setattr(module, name, counted(getattr(module, name)))
    else:  # we
        step = WeightEvolution.step

        def step_then_die(self, e):
            stats = step(self, e)
            if e == epoch:
                _die()
            return stats

        WeightEvolution.step = step_then_die


if __name__ == "__main__":
    argv = sys.argv[1:]
    assert argv[0] == "--fault", "usage: fault_runner.py --fault ACTION:POINT:EPOCH[:RANK] <train.py arguments>"
    install(argv[1])
    train.errors.exit_process(train.cli(argv[2:]))  # as train.py ends
