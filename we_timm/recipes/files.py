"""Run files, written atomically: a crash never leaves a half-written file, only the old one or the new one.

Layout of a run folder (timm's, with safetensors weights):

    args.yaml                      resolved arguments, loadable with `-c`
    summary.csv                    timm's columns (epoch, train_loss, eval_*, lr) + we_* columns
    we_stats.jsonl                 one JSON line per WE step, with inferior filters per parameter
    summary.png                    training curves beside WE selection rates / inferior counts
    last.pth.tar                   full training state of the latest epoch, for --resume (timm's layout)
    checkpoint-<epoch>.pth.tar     the --checkpoint-hist best epochs by eval metric (their training states)
    model_best.pth.tar             the best epoch's training state (timm's validate.py reads it)
    recovery.pth.tar               with --recovery-interval: the newest state inside the current epoch
    last.safetensors               when the run stops: the weights of last.pth.tar (`_ema` sibling: EMA weights)
    model_best.safetensors         when the run stops: the weights of model_best.pth.tar (+ `_ema` sibling)

Every file goes through `atomic_write`: a hidden temp file beside the target, fsynced, then renamed into
place; kept copies are hard links where the filesystem allows.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import shutil
from typing import Any, Callable, Iterable, Mapping


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run `write(tmp)` on a temp file beside `path`, fsync it, then `os.replace` it in place.

    Readers never see a half-written file: either the old one or the new one. OSError if the
    folder is missing.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot save {path}: directory {parent} does not exist")
    tmp = create_temp(parent, os.path.basename(path))
    mode = os.stat(tmp).st_mode & 0o777  # what the umask allows
    try:
        write(tmp)
        st = os.stat(tmp)
        if st.st_mode & 0o777 != mode and st.st_nlink == 1:  # some writers (safetensors) recreate the file 0600
            os.chmod(tmp, mode)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(parent)


def create_temp(folder: str, name: str) -> str:
    """An empty hidden file `.<name>.<8 hex>.tmp` in `folder`, created with the umask's permissions.

    (`tempfile.mkstemp` would make it 0600, and the checkpoint unreadable to others.)
    """
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # what create_temp makes


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Delete the partial temp files that writes killed mid-way (SIGKILL, power loss) left in `folder`.

    Call it only where no other process is writing into the folder. Returns the removed paths.
    """
    removed = []
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and _TEMP_NAME.match(entry.name):
            os.remove(entry.path)
            removed.append(entry.path)
    return sorted(removed)


def _fsync_dir(path: str) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """OSError naming `flag` unless `path` can be created (or appended to) now, before hours of work."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path} is a directory")
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{flag} {path}: the folder {parent} does not exist")
    if not os.access(path if os.path.exists(path) else parent, os.W_OK):
        raise PermissionError(f"{flag} {path} is not writable")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically replace `path` with `text` (UTF-8)."""
    write_bytes(path, text.encode("utf-8"))


def link_or_copy(src: str, dst: str) -> None:
    """Atomically make `dst` a copy of `src` (a hard link where possible)."""
    def write(tmp: str) -> None:
        os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    atomic_write(dst, write)


def remove(path: str) -> None:
    """Delete `path` if it exists."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def json_safe(value: Any) -> Any:
    """`value` with tuples as lists and anything JSON cannot hold as its `str`."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ----------------------------------------------------------------------------- summaries and plots


def columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every key of `rows`, in order of first appearance."""
    cols: list[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    return cols


def write_summary(path: str, rows: list[Mapping[str, Any]]) -> None:
    """All epochs' rows as CSV (timm's `update_summary` columns first, we_* after); rewritten whole."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(rows), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def write_results(results: dict[str, Any], path: str, fmt: str) -> None:
    """validate.py's results: append a CSV row (header when new) or write a JSON object."""
    if fmt == "json":
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        return
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results))
        if new:
            writer.writeheader()
        writer.writerow(results)


def write_jsonl(path: str, records: list[Mapping[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(json_safe(r), sort_keys=True) + "\n" for r in records))


def save_figure(path: str, fig: Any) -> None:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (imported on first use only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_summary(path: str, rows: list[Mapping[str, Any]]) -> None:
    """Loss, accuracy and LR per epoch; with WE, its selection rates and inferior filters per pool beside them."""
    plt = pyplot()
    panels = [
        ("loss", ["train_loss", "eval_loss"]),
        ("accuracy (%)", ["eval_top1", "eval_top5"]),
        ("learning rate", ["lr"]),
    ]
    cols = columns(rows)
    rates = [c for c in cols if c.startswith("we_rate_")]
    if rates:
        panels.append(("WE selection rate", rates))
        panels.append(("WE inferior filters", [c for c in cols if c.startswith("we_selected_")]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(path, fig)
