"""What train.py measures and writes besides the weights: log.csv and val.csv (their columns and CSVLog, the
writer that keeps them one run's rows across resumes), the validation loss at fixed t and noise (comparable
between runs and checkpoints; evaluate.py reports it too) and the prompts of the sample grids."""
import csv
import os

import torch
from tqdm import tqdm

import samplers as S
from checkpoint import write_atomic
from config import Config
from objective import flow_matching_loss, noise_like
from runtime import autocast_for, to_device


N_T_BUCKETS = 4  # losses are also logged per quarter of t (as minRF does): loss_t0..3, val_loss_t0..3
# log.csv's columns (then gate_<name> per Fourier gate); a new field: add it here and to the row in train.py's loop,
# generate_graph.py plots it in stats.png
LOG_COLUMNS = (["step", "epoch", "loss"] + [f"loss_t{i}" for i in range(N_T_BUCKETS)]
               + ["lr", "grad_norm", "images_per_s", "peak_mem_mb", "nonfinite", "loss_scale"])
VAL_COLUMNS = ["step", "val_loss"] + [f"val_loss_t{i}" for i in range(N_T_BUCKETS)]
VAL_T_STEP = (5 ** 0.5 - 1) / 2  # 1 / golden ratio: consecutive samples' t far apart, all of [0, 1) covered
VAL_NOISE_SEED = 12345  # fixed, not cfg.seed: validation losses of runs with other seeds compare


class CSVLog:
    """Appends rows to a CSV file, writing the header once. A resumed run (resumed_at = its step) first
    drops the rows of later steps (written after that checkpoint, before the interruption) and any row
    cut off by a kill or a full disk, so the log reads as one run."""

    def __init__(self, path, resumed_at, columns):
        self.path, self.columns = path, columns
        if os.path.exists(path) and resumed_at is not None:
            from generate_graph import csv_rows  # (a byte order mark or a garbled line costs no other rows)
            rows = [r for r in csv_rows(path) if None not in r.values() and None not in r
                    and r.get("step", "").isdigit() and int(r["step"]) <= resumed_at]
            write_atomic(path, lambda tmp: self.write_all(tmp, rows))
        elif not os.path.exists(path):
            self.write_all(path, [])

    def write_all(self, path, rows):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns)
            writer.writerows([row.get(c, "") for c in self.columns] for row in rows)

    def write(self, row: dict):
        unknown = [key for key in row if key not in self.columns]
        if unknown:  # a field added to the row but not to the columns would be dropped without a word
            raise ValueError(f"{self.path}: no column {', '.join(unknown)} (add it to LOG_COLUMNS in metrics.py)")
        try:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow([row.get(c, "") for c in self.columns])
        except OSError as e:  # a full disk costs a log line, not the run
            tqdm.write(f"warning: {self.path}: row for step {row.get('step')} not written ({e.strerror})")


@torch.no_grad()
def validation_loss(model, val_loader, cfg: Config, device, n_buckets=N_T_BUCKETS) -> dict:
    """{'val_loss', 'val_loss_t0'..}: the flow-matching loss over the held-out split, in total and per bucket
    of t, with every caption kept (no dropout); {} without a held-out split."""
    if val_loader is None:
        return {}
    sums, counts = torch.zeros(n_buckets), torch.zeros(n_buckets)
    for batch in val_loader:
        # Each sample its own t and noise, fixed by its place i in the split (not by batch size, order or
        # seed): t = frac((i + 0.5) / golden ratio) spreads t evenly over the split, the noise is seeded with i.
        index = batch["index"]
        t = ((index.double() + 0.5) * VAL_T_STEP % 1).float().to(device)
        eps = torch.stack([noise_like(x, cfg, torch.Generator().manual_seed(VAL_NOISE_SEED + int(i)))
                           for x, i in zip(batch["latents"], index)])
        batch = to_device(batch, device, cfg.trim_text)
        batch["drop"] = torch.zeros_like(batch["drop"])
        with autocast_for(cfg, device):
            _, per_sample, t = flow_matching_loss(model, batch, cfg, None, t=t, eps=eps.to(device))
        s, c = S.loss_per_bucket(per_sample.float().cpu(), t.cpu(), n_buckets)
        sums, counts = sums + s, counts + c
    if counts.sum() == 0:
        return {}
    row = {"val_loss": (sums.sum() / counts.sum()).item()}
    for i in range(n_buckets):
        row[f"val_loss_t{i}"] = (sums[i] / counts[i]).item() if counts[i] > 0 else ""
    return row


def default_val_prompts(cfg: Config, val_set) -> list:
    """The sample grids' prompts: val_prompts, else for shapes a spread of trained (colour, shape) pairs and the
    held-out ones, else the first held-out captions."""
    if cfg.val_prompts:
        return [p.strip() for p in cfg.val_prompts.split("|") if p.strip()]
    if cfg.data_source == "shapes":
        import shapes
        prompts = shapes.eval_prompts()
        seen = [a for a in prompts if not shapes.is_held_out(a)]
        held_out = [next(a for a in prompts if (a["color"], a["shape"]) == pair) for pair in sorted(shapes.HELD_OUT)]
        return [shapes.caption(a) for a in seen[::len(seen) // 6][:6] + held_out]  # spread + held-out pairs
    captions = [val_set[i]["caption"] for i in range(min(8, len(val_set)))] if val_set else []
    return captions or ["a photo"]
