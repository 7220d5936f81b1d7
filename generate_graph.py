"""Plot a run's training curves: python generate_graph.py runs/<name>

Reads runs/<name>/log.csv (the columns of metrics.LOG_COLUMNS, then gate_* when the Fourier filters are on)
and val.csv when present (step, val_loss, val_loss_t0..val_loss_t3), and writes into the run
folder:
    loss.png        raw and EMA-smoothed training loss, learning rate on a twin axis, validation loss points
    loss_per_t.png  loss per timestep bucket (t=0 data .. t=1 noise) over training
    gates.png       mean |gate| of each Fourier filter (only when the log has gate_ columns)
    stats.png       every other numeric column (grad_norm, images_per_s, peak_mem_mb, ... and any column you
                    add to metrics.LOG_COLUMNS), one small panel each; columns that never change are left out
train.py calls make_graphs(run_dir) at the end of a run; blank cells (a value not logged that step) are gaps.
"""
import csv
import math
import os
import re
import sys

from config import ConfigError, exit_with_help_if_asked, main_guard

BUCKET_COLUMN = re.compile(r"^loss_t(\d+)$")
PLOTTED_ELSEWHERE = ("step", "epoch", "loss", "lr")  # and loss_t*, gate_*: not in stats.png


def csv_rows(path: str) -> list:
    """The rows (dicts) of a CSV with a header; what is damaged costs its own lines, not the file."""
    # garbage bytes cost their rows; utf-8-sig: a byte order mark (a log saved from Excel) is not in the header
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader, rows = csv.DictReader(f), []
        while True:
            try:
                rows.append(next(reader))
            except StopIteration:
                return rows
            except csv.Error:  # a stray quote with a long tail, an overlong line: those lines, not the file
                continue


def read_csv_columns(path: str) -> dict:
    """{column: list of floats} from a CSV with a header; blank or unparseable cells become NaN, rows
    without a step (e.g. a line being written while we read) are skipped."""
    rows = csv_rows(path)
    if not rows or "step" not in rows[0]:
        return {}
    columns = {name: [] for name in rows[0] if name is not None}

    def number(cell):
        try:
            return float(cell)
        except (TypeError, ValueError):
            return math.nan

    for row in rows:
        if math.isnan(number(row.get("step"))):
            continue
        for name in columns:
            columns[name].append(number(row.get(name)))
    return columns if columns["step"] else {}


def ema_smooth(values: list, smoothing: float) -> list:
    """Bias-corrected exponential moving average (as in Adam), skipping NaN cells."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        if not math.isnan(v):
            avg = smoothing * avg + (1 - smoothing) * v
            weight = smoothing * weight + (1 - smoothing)
        out.append(avg / weight if weight > 0 else math.nan)
    return out


def _points(steps: list, values: list):
    """(steps, values) with the blank (NaN) and infinite cells dropped (so a sparsely logged column, or one
    with an overflowed fp16 step's inf, still draws a line)."""
    pairs = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _bucket_label(i: int, n: int) -> str:
    return f"t in [{i / n:.2f}, {(i + 1) / n:.2f}" + ("]" if i == n - 1 else ")")


def make_graphs(run_dir: str, smoothing: float = 0.9) -> list:
    """Write loss.png, loss_per_t.png, gates.png and stats.png (each when its data exists) into run_dir;
    return their paths. A missing or empty log.csv raises ConfigError (one line naming the file)."""
    log_path = os.path.join(run_dir, "log.csv")
    if not os.path.isfile(log_path):
        raise ConfigError(f"{log_path}: no such file (is {run_dir!r} a run folder?)")
    log = read_csv_columns(log_path)
    if not log or "loss" not in log or not _points(log["step"], log["loss"])[0]:
        raise ConfigError(f"{log_path}: empty log (no rows with a step and a loss column yet)")
    val_path = os.path.join(run_dir, "val.csv")
    val = read_csv_columns(val_path) if os.path.isfile(val_path) else {}

    import matplotlib                          # here, not at import: importing this module does nothing
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = log["step"]
    written = []

    def save(fig, name):
        path = os.path.join(run_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # --- loss.png: raw + smoothed loss, lr on a twin axis, validation points
    fig, ax = plt.subplots(figsize=(8, 4.5))
    s, v = _points(steps, log["loss"])
    ax.plot(s, v, color="tab:blue", alpha=0.25, lw=0.8, label="loss")
    ax.plot(s, ema_smooth(v, smoothing), color="tab:blue", lw=1.8, label=f"loss (EMA {smoothing})")
    if "val_loss" in val:
        vs, vv = _points(val["step"], val["val_loss"])
        ax.plot(vs, vv, "o-", color="tab:red", ms=4, lw=1, label="val loss")
    positive = [x for x in v if x > 0]
    if positive and len(positive) == len(v) and max(positive) / min(positive) > 20:
        ax.set_yscale("log")                   # flow-matching losses fall fast early, then slowly
    ax.set_xlabel("step")
    ax.set_ylabel("loss (the training objective)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if "lr" in log and _points(steps, log["lr"])[0]:
        ax_lr = ax.twinx()
        ax_lr.plot(*_points(steps, log["lr"]), color="tab:gray", ls="--", lw=1, label="lr")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        h, lab = ax_lr.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    ax.legend(handles, labels, loc="best", fontsize=8)
    ax.set_title(f"{os.path.basename(os.path.normpath(run_dir))}: training loss")
    save(fig, "loss.png")

    # --- loss_per_t.png: one smoothed line per timestep bucket (plus validation per bucket)
    buckets = sorted((int(m.group(1)), name) for name in log if (m := BUCKET_COLUMN.match(name)))
    if any(_points(steps, log[name])[0] for _, name in buckets):
        n = len(buckets)
        colors = plt.get_cmap("viridis")
        fig, ax = plt.subplots(figsize=(8, 4.5))
        plotted = []
        for i, name in buckets:
            color = colors(i / max(n - 1, 1))
            s, v = _points(steps, log[name])
            if s:
                ax.plot(s, ema_smooth(v, smoothing), color=color, lw=1.5, label=_bucket_label(i, n))
                plotted += v
            if f"val_{name}" in val:
                vs, vv = _points(val["step"], val[f"val_{name}"])
                ax.plot(vs, vv, "o", color=color, ms=4)
        ax.set_xlabel("step")
        if plotted and min(plotted) > 0 and max(plotted) / min(plotted) > 20:
            ax.set_yscale("log")  # as loss.png: else every bucket lies flat near 0 after the first steps
        ax.set_ylabel(f"loss (EMA {smoothing}); dots: validation")
        ax.set_title("loss per timestep bucket (t=0 data, t=1 noise)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "loss_per_t.png")

    # --- gates.png: every gate_ column
    gates = [name for name in log if name.startswith("gate_") and _points(steps, log[name])[0]]
    if gates:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name in gates:
            ax.plot(*_points(steps, log[name]), lw=1.2, label=name[len("gate_"):])
        ax.set_xlabel("step")
        ax.set_ylabel("mean |gate| (per filter)")
        ax.set_title("Fourier gates")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=max(1, len(gates) // 12))
        save(fig, "gates.png")

    # --- stats.png: one panel per other numeric column that changes
    others = {name: _points(steps, log[name]) for name in log if name not in PLOTTED_ELSEWHERE
              and not BUCKET_COLUMN.match(name) and not name.startswith("gate_")}
    others = {name: (s, v) for name, (s, v) in others.items() if len(set(v)) > 1}
    if others:
        cols = min(len(others), 3)
        rows = -(-len(others) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
        for ax, (name, (s, v)) in zip(axes.flat, others.items()):
            ax.plot(s, v, lw=1.0, color="tab:purple")
            if min(v) > 0 and max(v) / min(v) > 20:
                ax.set_yscale("log")  # e.g. a gradient norm with early spikes
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(others):]:
            ax.axis("off")
        save(fig, "stats.png")
    return written


def main():
    exit_with_help_if_asked(sys.argv[1:])
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        raise ConfigError("usage: python generate_graph.py runs/<name>")
    run_dir = sys.argv[1]
    written = make_graphs(run_dir)
    print(f"wrote {len(written)} graphs to {run_dir}: {', '.join(os.path.basename(p) for p in written)}")


if __name__ == "__main__":
    main_guard(main)
