"""What train.py measures and writes besides the weights: log.csv and val.csv (their columns, the running
statistics of the steps between log lines, and CSVLog, the writer that keeps them one run's rows across
resumes), the validation loss at fixed t and noise (comparable between runs and checkpoints; evaluate.py
reports it too) and the prompts of the sample grids."""
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


class RunningStats:
    """What a log line says of the steps since the one before, kept on the device (read on logging steps only:
    no host-device sync in between): the mean loss, overall and per quarter of t, of the finite micro-batch
    losses (a non-finite one's step is skipped), the skipped steps and the longest run of them."""

    def __init__(self, device):
        self.device = device
        self.skipped, self.streak, self.longest = (torch.zeros((), dtype=torch.long, device=device) for _ in range(3))
        self.new_window()

    def new_window(self):
        """Loss sums from zero (every rank after a log line: the next all-reduce sums the new window only)."""
        self.loss_sum, self.loss_n = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        self.bucket_sums = torch.zeros(N_T_BUCKETS, device=self.device)
        self.bucket_counts = torch.zeros(N_T_BUCKETS, device=self.device)

    def add_micro_batch(self, loss, per_sample, t):
        """A micro-batch's loss (a skipped step's NaN must not spoil the mean); returns whether it is finite."""
        finite = torch.isfinite(loss.detach())
        self.loss_sum = self.loss_sum + torch.where(finite, loss.detach(), 0.0)
        self.loss_n = self.loss_n + finite
        sums, counts = S.loss_per_bucket(per_sample.float(), t, N_T_BUCKETS, skip_nonfinite=True)
        self.bucket_sums, self.bucket_counts = self.bucket_sums + sums, self.bucket_counts + counts
        return finite

    def add_step(self, failed, finite):
        """A step's outcome (0-dim bool tensors): failed = skipped as non-finite (an fp16 overflow, which only
        lowers the loss scale, is not), finite = the weights were updated (ends a run of skipped steps)."""
        self.streak = torch.where(failed, self.streak + 1, torch.where(finite, 0, self.streak))
        self.skipped, self.longest = self.skipped + failed, torch.maximum(self.longest, self.streak)

    def take_skips(self):
        """(skipped steps, longest run of them) since the last call, as ints; a run still going counts on."""
        n_skipped, n_longest = torch.stack([self.skipped, self.longest]).tolist()
        self.skipped, self.longest = torch.zeros_like(self.skipped), self.streak.clone()
        return n_skipped, n_longest

    def packed_losses(self):
        """The loss sums as one tensor, for an all-reduce over the ranks (then unpack_losses)."""
        return torch.cat([self.loss_sum.reshape(1), self.loss_n.reshape(1).float(), self.bucket_sums,
                          self.bucket_counts])

    def unpack_losses(self, packed):
        self.loss_sum, self.loss_n, self.bucket_sums, self.bucket_counts = packed[0], packed[1], *packed[2:].chunk(2)

    def loss_columns(self) -> dict:
        """{'loss': the mean (nan if every step of the window was skipped), 'loss_t0'...: per quarter of t}."""
        row = {"loss": (self.loss_sum / self.loss_n).item()}
        sums, counts = self.bucket_sums.tolist(), self.bucket_counts.tolist()
        for i in range(N_T_BUCKETS):
            row[f"loss_t{i}"] = sums[i] / counts[i] if counts[i] else ""
        return row


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
