"""Finding and loading a trained run (sample.py, evaluate.py, the notebook): its config.json, its EMA weights
(the export in model/, else or when newer the checkpoints' EMA weights), the step they were trained to, and
the latent space its images decode through."""
import json
import math
import os
import re
import sys

import torch

from config import ConfigError, config_from_dict


# settings a checkpoint given with --checkpoint must share with the run's config.json (weights' shapes are
# checked when they load): how its output is read, and the latents and text embeddings it was trained on
SAMPLING_SETTINGS = ("prediction", "x_pred_t_min", "sigma_data", "latent_space", "vae", "latent_norm",
                     "text_encoder", "text_encoder_type", "text_layer", "max_token_length")
def latent_space_for(cfg, device="cpu"):
    """The run's LatentSpace as training used it: with latent_norm, the per-channel mean/std its training
    data was normalised with (run_dir/latent_stats.json, written by train.py; older runs: the cache's
    manifest). Without them the decoded colours would be off: a warning says so."""
    from latents import LATENT_STATS, LatentSpace
    stats = None
    if cfg.latent_norm:
        path = os.path.join(cfg.run_dir, LATENT_STATS)
        if not os.path.isfile(path):
            path = os.path.join(cfg.cache_dir, "manifest.json")
        try:
            with open(path, encoding="utf-8") as f:
                stats = json.load(f)
            why = stats_problem(stats, cfg.latent_channels)
        except (OSError, ValueError) as e:
            why = f"is not readable ({type(e).__name__})"
        if why:
            stats = None
            print(f"warning: latent_norm is on but {path} {why}: images are decoded without the cache's "
                  "latent mean/std", file=sys.stderr)
    return LatentSpace.from_config(cfg, device=device, stats=stats)


def stats_problem(stats, channels: int):
    """What is wrong with a latent_stats.json / manifest's latent_mean and latent_std, or None."""
    if not isinstance(stats, dict):
        return "is not a JSON object"
    for key in ("latent_mean", "latent_std"):
        values = stats.get(key)
        if not (isinstance(values, list) and len(values) == channels
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            return f"has no {key} of {channels} finite numbers"
    if min(stats["latent_std"]) <= 0:
        return "has a latent_std <= 0"
    return None


def run_step(run_dir, checkpoint=None):
    """The step load_run's model was trained to: the newer of the export's and the newest checkpoint's
    (exports from before steps were recorded: the checkpoint's), or None; the given checkpoint's step."""
    from checkpoint import checkpoint_step, step_files
    from model import exported_step
    if checkpoint is not None:
        path = find_checkpoint(run_dir, checkpoint)
        if re.fullmatch(r"step_\d+\.pt", os.path.basename(path)):
            return checkpoint_step(path)
        try:  # a renamed copy: the step it holds
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("step")
        except Exception:
            return None
    steps = [checkpoint_step(p) for p in step_files(os.path.join(run_dir, "checkpoints"))[-1:]]
    steps += [s for s in [exported_step(os.path.join(run_dir, "model"))] if s is not None]
    return max(steps) if steps else None


def find_checkpoint(run_dir, checkpoint) -> str:
    """The checkpoint file that `checkpoint` names: a step of the run (4000, its checkpoints/step_0004000.pt)
    or a path; a one-line error naming the steps there are."""
    from checkpoint import checkpoint_step, step_files
    if os.path.isfile(str(checkpoint)):
        return str(checkpoint)
    ckpts = step_files(os.path.join(run_dir, "checkpoints"))
    match = [p for p in ckpts if str(checkpoint).isdigit() and checkpoint_step(p) == int(checkpoint)]
    if not match:
        steps = ", ".join(str(checkpoint_step(p)) for p in ckpts) or "none"
        raise ConfigError(f"--checkpoint {checkpoint}: no such checkpoint file or step of {run_dir} (its "
                          f"checkpoints: {steps})")
    return match[0]


def run_and_checkpoint(path, checkpoint=None) -> tuple:
    """(run_dir, checkpoint) for what a user typed as the run: a checkpoint file of a run
    (runs/x/checkpoints/step_0004000.pt) means that run at that checkpoint; anything else is the run."""
    folder = os.path.dirname(os.path.abspath(path))
    if checkpoint is None and os.path.isfile(path) and path.endswith(".pt") and os.path.basename(folder) == "checkpoints":
        return os.path.dirname(folder), path
    return path, checkpoint


def load_run(run_dir, device="cpu", checkpoint=None):
    """(cfg, EMA model) of a run: model/ (the export), else the newest readable checkpoint's EMA weights;
    with checkpoint (a step or a checkpoint file, see find_checkpoint) that checkpoint's EMA weights.

    A checkpoint newer than the export (a resumed run that stopped before exporting: kill -9, out of
    memory) is used instead, with a warning. A missing run, an unreadable config.json or a model that does
    not match it is a one-line ConfigError; an unreadable export or checkpoint is reported and the next one
    tried, so a damaged file loses nothing.
    """
    from checkpoint import checkpoint_step, step_files
    from model import DiTConfig, SingleStreamDiT, exported_step
    cfg_path = os.path.join(run_dir, "config.json")
    # cfg.run_dir is where the run is now (it may have been moved or copied since it was trained)
    where = os.path.abspath(run_dir)
    exported_here = os.path.isfile(os.path.join(run_dir, "model.safetensors"))  # its config.json is the model's
    if exported_here or not os.path.isfile(cfg_path):
        run = next((d for d in (os.path.dirname(where), os.path.dirname(os.path.dirname(where)))
                    if os.path.isfile(os.path.join(d, "config.json")) and
                    any(os.path.isdir(os.path.join(d, sub)) for sub in ("model", "checkpoints"))), None)
        what = ("a run's exported model" if exported_here else "a file, not a run folder" if os.path.isfile(run_dir)
                else "not a run folder (no config.json)")
        raise ConfigError(f"{run_dir}: {what}; " + (f"give the run folder, {run}" if run else "train one with train.py"))
    try:
        with open(cfg_path, encoding="utf-8") as f:
            saved = json.load(f)
        cfg = config_from_dict(dict(saved, out_dir=os.path.dirname(where), run_name=os.path.basename(where)))
    except (ValueError, AttributeError, TypeError) as e:  # not JSON, or JSON that is not an object
        raise ConfigError(f"{cfg_path}: not a readable run config ({str(e).splitlines()[0]})") from None
    expected = DiTConfig.from_config(cfg)
    model_dir = os.path.join(run_dir, "model")
    ckpts = step_files(os.path.join(run_dir, "checkpoints"))  # oldest first
    exported = exported_step(model_dir)
    newer = [p for p in ckpts if exported is not None and checkpoint_step(p) > exported]
    problem = f"{model_dir} is from step {exported}, older than {newer[-1]}" if newer else None
    sources = newer[::-1] + [model_dir] + [p for p in ckpts if p not in newer][::-1]
    if checkpoint is not None:  # that one or a one-line error, never another
        sources, problem = [find_checkpoint(run_dir, checkpoint)], None
    for source in sources:
        if source == model_dir:
            if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
                continue
            try:
                model = SingleStreamDiT.from_pretrained(model_dir, device=device)
            except Exception as e:
                problem = f"{model_dir}: cannot load the model ({str(e).splitlines()[0]})"
                continue
            got = model.dc
            if (got.hidden_size, got.depth, got.in_channels, got.text_dim) != \
                    (expected.hidden_size, expected.depth, expected.in_channels, expected.text_dim):
                raise ConfigError(f"{model_dir}: model does not match {cfg_path} (hidden {got.hidden_size}/"
                                  f"{expected.hidden_size}, depth {got.depth}/{expected.depth})")
            return cfg, model.eval()
        try:
            state = torch.load(source, map_location="cpu", weights_only=False)
            ema = state["ema"]
            if not isinstance(ema, dict):
                raise TypeError("its ema is not a state dict")
        except Exception as e:  # truncated, foreign or not a training checkpoint
            if checkpoint is not None:
                raise ConfigError(f"{source}: not a readable checkpoint ({type(e).__name__})") from None
            print(f"warning: {source}: not a readable checkpoint ({type(e).__name__}); trying an older one",
                  file=sys.stderr)
            continue
        trained = (state.get("config") or {}) if checkpoint is not None else {}  # another run's checkpoint?
        differ = [k for k in SAMPLING_SETTINGS if k in trained and trained[k] != getattr(cfg, k)]
        if differ:
            raise ConfigError(f"{source}: not a checkpoint of {run_dir} (" + ", ".join(
                f"{k}={trained[k]!r} there, {getattr(cfg, k)!r} here" for k in differ) + ")")
        model = SingleStreamDiT(expected)
        try:
            model.load_state_dict(ema)
        except RuntimeError as e:
            lines = str(e).splitlines()  # "Error(s) in loading state_dict for SingleStreamDiT:", then what
            raise ConfigError(f"{source}: checkpoint does not match {cfg_path}: "
                              f"{(lines[1:] or lines)[0].strip()[:200]}") from None
        if problem:
            print(f"warning: {problem}; using the EMA weights of {source}", file=sys.stderr)
        return cfg, model.to(device).eval()
    raise ConfigError(problem or f"{run_dir}: no exported model/ and no readable checkpoint in checkpoints/")
