"""Benchmark: train.py's training loop vs a plain timm + torch loop, and weight evolution's share of an epoch.

Usage: python bench/throughput.py [--model resnet18 --model-kwargs ...] [--img-size 32] [-b 64] [--repeats 5]

Both loops train copies of the same timm model (same init) with the same timm
optimizer (and step kernel), loss and batches, in this process, on the same device. The batches
are the digits training set run once through timm's eval transforms and kept
in memory, so data loading is not timed and the ratio measures the loop
itself: train.py's `train_one_epoch` (Accelerate-prepared model, optimizer and
loader, `accumulate`, loss meter, LR `step_update`) against
`loss = ce(model(x), y); loss.backward(); opt.step(); opt.zero_grad()`.
Epochs alternate between the two loops (plain, ours, plain, ...) to spread
machine noise; the ratio is given for the median and the best wall-clock
epochs and for the median process CPU time (robust to other load on the machine). The WE share is the median `we.step`
time over the median epoch time of train.py's loop on this epoch of digits,
and, for scale, projected onto a CIFAR-sized epoch (50k images) at the
measured per-step speed.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from timm.data import create_transform  # noqa: E402
from timm.optim import create_optimizer_v2, optimizer_kwargs  # noqa: E402
from we_timm.recipes.dataset import DigitsDataset  # noqa: E402
from we_timm.recipes.runtime import optimizer_kernel  # noqa: E402

CIFAR_IMAGES = 50_000


def bench_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10, help="timed epochs per loop (after one warm-up epoch each)")
    p.add_argument("--we-repeats", type=int, default=20, help="timed weight-evolution steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p.parse_known_args(argv)


def digits_batches(img_size: int, batch_size: int) -> torch.utils.data.TensorDataset:
    """Digits train split through timm's eval transforms, as one in-memory tensor dataset."""
    ds = DigitsDataset("train", transform=create_transform(img_size, is_training=False, crop_pct=1.0))
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    n = len(xs) // batch_size * batch_size
    return torch.utils.data.TensorDataset(torch.stack(xs[:n]), torch.tensor(ys[:n]))


def plain_epoch(model, optimizer, loss_fn, loader, device) -> tuple[float, float]:
    """The reference loop: forward, loss, backward, step, zero_grad. Returns (wall, process CPU) seconds."""
    model.train()
    start, cpu = time.perf_counter(), time.process_time()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def ours_epoch(t, loader, epoch: int) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    train.train_one_epoch(epoch, t, loader)
    _sync(t.accelerator.device)
    return time.perf_counter() - start, time.process_time() - cpu


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build(train_argv: list[str]):
    """train.py's own setup (model, optimizer, schedule, loss, WE) plus a copy for the plain loop."""
    args = train.parse_args(["--smoothing", "0", "--log-interval", "1000000", "--weight-evolution", *train_argv])
    acc = train.build_accelerator(args)
    t, _ = train.setup(args, acc)
    plain_model = copy.deepcopy(t.raw_model)
    kernel = optimizer_kernel(args.opt, args.opt_kwargs, acc)  # the same step kernel as train.py's
    plain_opt = create_optimizer_v2(plain_model, **optimizer_kwargs(cfg=args), **kernel, **args.opt_kwargs)
    data = digits_batches(t.meta["data_config"]["input_size"][-1], args.batch_size)
    def make_loader():
        return torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False, drop_last=True)
    t.model, t.optimizer, t.loader_train = acc.prepare(t.model, t.optimizer, make_loader())
    return args, t, t.loader_train, (plain_model, plain_opt, make_loader())


def main(argv: list[str] | None = None) -> None:
    opts, train_argv = bench_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if not any(a in ("--model",) for a in train_argv):  # default: the digits demo's ResNet-20-like model
        train_argv = ["--model", "resnet18", "--model-kwargs", "layers=[3,3,3,0]", "channels=[16,32,64,64]",
                      "stem_width=16", "--img-size", "32", "-b", "64", "--lr", "0.1", "--sched", "step",
                      "--warmup-epochs", "0", *train_argv]
    args, t, loader, (plain_model, plain_opt, plain_loader) = build(train_argv)
    device, loss_fn = t.accelerator.device, torch.nn.CrossEntropyLoss()
    images = len(loader) * args.batch_size
    plain, ours = [], []
    for epoch in range(opts.repeats + 1):  # epoch 0 warms both up
        p = plain_epoch(plain_model, plain_opt, loss_fn, plain_loader, device)
        o = ours_epoch(t, loader, epoch)
        if epoch:
            plain.append(p)
            ours.append(o)
    we_times = []
    for i in range(opts.we_repeats):
        start = time.perf_counter()
        t.we.step(10 + i)
        _sync(device)
        we_times.append(time.perf_counter() - start)
    report(args, device, images, len(loader), plain, ours, we_times)


def report(args, device, images: int, steps: int, plain: list, ours: list, we_times: list[float]) -> None:
    cpu_ratio = statistics.median(x[1] for x in plain) / statistics.median(x[1] for x in ours)
    plain, ours = [x[0] for x in plain], [x[0] for x in ours]
    p, o, w = statistics.median(plain), statistics.median(ours), statistics.median(we_times)
    step = o / steps
    cifar_epoch = CIFAR_IMAGES // args.batch_size * step
    print(f"model {args.model} {args.model_kwargs or ''} @ {args.img_size or ''}px, batch {args.batch_size}, "
          f"{steps} steps/epoch, device {device}, torch threads {torch.get_num_threads()}")
    print(f"plain timm+torch loop : {images / p:9.1f} img/s   (epochs: {', '.join(f'{x:.2f}s' for x in plain)})")
    print(f"train.py train_one_epoch: {images / o:7.1f} img/s   (epochs: {', '.join(f'{x:.2f}s' for x in ours)})")
    print(f"throughput ratio train.py / plain = {p / o:.3f} (median wall), {min(plain) / min(ours):.3f} (best wall), "
          f"{cpu_ratio:.3f} (median process CPU time)   (target >= 0.98)")
    print(f"WE step: {w * 1e3:.2f} ms median of {len(we_times)} "
          f"-> {100 * w / o:.3f}% of this {steps}-step digits epoch, "
          f"{100 * w / (w + cifar_epoch):.4f}% of a {CIFAR_IMAGES // args.batch_size}-step CIFAR-sized epoch (target < 0.1%)")


if __name__ == "__main__":
    main()
