"""Checkpoints: plain dicts written atomically (write_atomic: temp file + rename, also used for the cache and
the model export), the newest K kept, and resume (check_resume_fits before any data work, then resume_run);
a fresh run sets an earlier run in its folder aside.

A checkpoint holds model, EMA, optimiser, step, epoch, batch position in the epoch, RNG states and the
resolved config (train.py builds it); the learning rate is a function of the step (optim.lr_at).
"""
import json
import os
import random
import re
import shutil
import time
from dataclasses import fields

import torch

from config import PRESETS, Config, ConfigError, get_config, to_dict
from optim import state_fits


def checkpoint_dir(cfg: Config) -> str:
    return os.path.join(cfg.run_dir, "checkpoints")


def list_checkpoints(cfg: Config) -> list:
    return step_files(checkpoint_dir(cfg))


def step_files(folder: str) -> list:
    """The step_<N>.pt files in a checkpoints folder, oldest step first (other files there left alone)."""
    try:
        names = [n for n in os.listdir(folder) if re.fullmatch(r"step_\d+\.pt", n)]
    except OSError:  # no such folder (yet)
        return []
    return sorted((os.path.join(folder, n) for n in names), key=checkpoint_step)


def rng_state(gen) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "gen": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, gen) -> bool:
    """Restore rng_state(); returns whether gen's stream was restored. A checkpoint of a run on another kind of
    device (resume may change device=) holds another generator's state: a CUDA generator's is 16 bytes (seed,
    offset), a CPU one's 5056, and set_state raises on the other's; gen is then left to the caller (resume_run
    seeds it). The global CUDA generators: as many as are visible here (a run on a machine with more GPUs saved
    one per GPU; set_rng_state_all would fail on the GPUs that are not here)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    restored = state["gen"].numel() == gen.get_state().numel()
    if restored:
        gen.set_state(state["gen"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"])[:torch.cuda.device_count()])
    return restored


class WriteError(OSError):
    """A file could not be written (a full disk); the message names it."""


def write_atomic(path: str, write, what: str = "") -> int:
    """write(tmp) into path + ".tmp", then rename it to path (a kill never leaves half a file); returns
    the size. A failure (a full disk: torch.save raises RuntimeError there, not OSError) removes the temp
    file and raises WriteError naming path; whatever was at path before is untouched."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise WriteError(f"{path}: {what}not written ({type(e).__name__}: {str(e).splitlines()[0][:80]}; "
                         "is the disk full?)") from None
    return os.path.getsize(path)


def write_json(path: str, obj, indent: int = 2) -> int:
    """json.dump(obj) into path atomically (write_atomic): run configs, the manifest, eval reports."""
    def dump(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
    return write_atomic(path, dump)


def save_checkpoint(cfg: Config, state: dict, say=print) -> str:
    """Write step_XXXXXXX.pt atomically (write_atomic), then drop all but the newest keep_checkpoints.
    An OSError means the checkpoint was not written; an old file that cannot be removed (a user deleted it
    meanwhile, a permission) is only reported with say()."""
    d = checkpoint_dir(cfg)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"step_{state['step']:07d}.pt")

    def remove(files):
        for old in files:
            try:
                os.remove(old)
            except FileNotFoundError:
                pass
            except OSError as e:
                say(f"warning: {old}: not removed ({e.strerror})")
    remove(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".pt.tmp"))  # left by a killed run
    write_atomic(path, lambda tmp: torch.save(state, tmp), what="checkpoint ")
    remove(list_checkpoints(cfg)[:-cfg.keep_checkpoints])
    return path


CHECKPOINT_KEYS = ("model", "ema", "optimizer", "step", "epoch", "batch_in_epoch", "rng")


def load_resume_checkpoint(cfg: Config, say=print):
    """(path, checkpoint dict) to resume from, or (None, None). resume=auto takes the newest readable
    checkpoint of the run (an unreadable one, or a file that is not one of our checkpoints, is reported
    with say() and the previous one used)."""
    if not cfg.resume:
        return None, None
    if cfg.resume == "auto":
        candidates = list_checkpoints(cfg)[::-1]
    elif not os.path.isfile(cfg.resume):
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint file")
    else:
        candidates = [cfg.resume]
    for path in candidates:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
            if missing:
                raise ValueError(f"no {', '.join(missing)} in it")
            return path, ckpt
        except Exception as e:  # truncated or foreign file
            message = f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
            if cfg.resume != "auto":
                raise ConfigError(message) from None
            say(f"warning: {message}; trying an older one")
    return None, None


def set_aside_later_checkpoints(cfg: Config, step: int) -> list:
    """Resuming from step S (an older checkpoint, or the newest readable one): checkpoints of later steps
    belong to the abandoned continuation (or are damaged). They are renamed *.pt.abandoned, so that neither
    pruning (which keeps the newest) nor a later resume=auto picks them over this run's own."""
    from model import exported_step  # (model.py imports this module)
    later = [p for p in list_checkpoints(cfg) if checkpoint_step(p) > step]
    export = os.path.join(cfg.run_dir, "model")
    if (exported_step(export) or 0) > step:  # their export too: sample.py would take it for this run's
        shutil.rmtree(export + ".abandoned", ignore_errors=True)
        later.append(export)
    for path in later:
        os.replace(path, path + ".abandoned")
    return later


def checkpoint_step(path: str) -> int:
    """step_0000120.pt -> 120."""
    return int(os.path.basename(path)[len("step_"):-len(".pt")])


def lock_run(cfg: Config):
    """Hold a lock on the run (.<name>.lock beside its folder) while training: a second train.py on the
    same run_dir would interleave logs and prune the other's checkpoints. Returns the open lock file (the
    lock lasts while it is open, and ends with the process, even on kill -9; unlock_run removes it);
    ConfigError if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; run without the lock
        return None
    parent, name = os.path.split(os.path.abspath(cfg.run_dir))
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".{name}.lock")
    deadline = time.time() + LOCK_WAIT_S
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "?"
            f.close()
            if not process_alive(owner) and time.time() < deadline:
                # a train.py killed (kill -9) with DataLoader workers: they were forked holding the lock, and
                # keep it until they notice, within seconds; a resume=auto right after waits for them
                time.sleep(0.25)
                continue
            raise ConfigError(f"{cfg.run_dir} is in use by another train.py (pid {owner}); give this one "
                              "another run_name=, or wait for it to end") from None
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # locked a file its holder removed on release meanwhile: lock the current one
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


LOCK_WAIT_S = 15.0  # how long lock_run waits for the lock of a train.py that is gone (see there)


def process_alive(pid: str) -> bool:
    """Whether the process of this pid (the lock file's text) runs; True when that cannot be told."""
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (PermissionError): it runs
        pass
    return True


def unlock_run(lock):
    """Remove the lock file and release the lock (lock_run's result; None: nothing to do)."""
    if lock is not None:
        try:
            os.remove(lock.name)
        except OSError:
            pass
        lock.close()


def set_aside_earlier_run(run_dir: str):
    """A fresh run (nothing resumed) in a folder that holds an earlier run moves that one to run_dir.N
    first: mixing the two would append to its logs and prune the new checkpoints as older than its own."""
    if not any(os.path.exists(os.path.join(run_dir, n)) for n in ("config.json", "log.csv", "checkpoints")):
        return None  # no folder, or only other tools' output (sanity_check.py's sanity/)
    n = 1
    while os.path.exists(f"{run_dir}.{n}"):
        n += 1
    os.rename(run_dir, f"{run_dir}.{n}")
    return f"{run_dir}.{n}"


# ---------------------------------------------------------------------------------------------
# Resume: does a checkpoint fit this config's model, and load it into the run


RESUME_FREE = {"resume", "max_steps", "max_minutes", "device", "num_workers", "log_every", "val_every",
               "checkpoint_every", "keep_checkpoints"}  # settings a resume changes without a note


def mismatch(cfg: Config, resume_path, trained: dict, detail: str) -> str:
    """Why a checkpoint's weights do not fit cfg's model: the model settings that differ (and the preset they
    match, the usual cause being a resume without the run's preset), else detail."""
    from model import DiTConfig
    model_keys = ["latent_channels"] + [f.name for f in fields(DiTConfig)  # the ones that shape weights
                                        if f.name not in ("in_channels", "grad_checkpointing", "abs_pos")]
    differ = [k for k in model_keys if k in trained and trained[k] != getattr(cfg, k)]
    why = "; ".join(f"{k}={trained[k]!r} there, {getattr(cfg, k)!r} here" for k in differ) or detail
    presets = [p for p in PRESETS if differ and all(getattr(get_config(p), k) == trained[k] for k in differ)]
    hint = f"; was it trained with the {presets[0]} preset? python train.py {presets[0]} ..." if presets else ""
    return f"{resume_path}: does not match this config ({why}){hint}"


def check_resume_fits(cfg: Config, resume_path, ckpt: dict):
    """Before any data work: a checkpoint whose weights do not fit cfg's model is a one-line error."""
    from model import DiTConfig, SingleStreamDiT
    with torch.device("meta"):  # shapes only: no memory, no time
        expected = {k: tuple(v.shape) for k, v in SingleStreamDiT(DiTConfig.from_config(cfg)).state_dict().items()}
    weights = ckpt["model"] if isinstance(ckpt["model"], dict) else {}
    got = {k: tuple(getattr(v, "shape", ())) for k, v in weights.items()}
    if got != expected:
        detail = next((f"{k}: {got.get(k)} there, {v} here" for k, v in expected.items() if got.get(k) != v),
                      "other weights")
        raise ConfigError(mismatch(cfg, resume_path, ckpt.get("config") or {}, detail))


def resume_run(cfg: Config, resume_path, ckpt, model, ema_model, optimizer, loss_scale, gen, rank, world):
    """Load a checkpoint into the run's model, EMA, optimiser (when its state fits this optimiser), loss scale
    and this rank's noise generator, and say what differs from the run it continues.
    Returns (step, epoch, batch_in_epoch)."""
    from cache import CACHE_SETTINGS, same_folder
    master, trained = rank == 0, ckpt.get("config") or {}
    same_optimizer = trained.get("optimizer", cfg.optimizer) == cfg.optimizer \
        and state_fits(optimizer, ckpt.get("optimizer"))  # the optimiser, and flat_8bit's layout
    try:
        model.load_state_dict(ckpt["model"])
        ema_model.load_state_dict(ckpt["ema"])
        if same_optimizer:
            optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(mismatch(cfg, resume_path, trained, str(e).splitlines()[0][:120])) from None
    if not same_optimizer and master:
        was = trained.get("optimizer", cfg.optimizer)
        layouts = ("per tensor", "flat") if getattr(optimizer, "members", None) else ("flat", "per tensor")
        why = (f"was trained with optimizer={was}" if was != cfg.optimizer else  # flat_8bit=on/off changed it
               "its optimiser state is {}, this run's {} (flat_8bit)".format(*layouts)
               if cfg.optimizer == "adamw8bit" else "its optimiser state does not fit")
        print(f"warning: {resume_path} {why}: optimizer={cfg.optimizer} starts from a fresh state")
    changed = [f"{k} {trained[k]!r} -> {v!r}" for k, v in to_dict(cfg).items()
               if k in trained and trained[k] != v and k not in RESUME_FREE
               and not (k in ("vae", "text_encoder") and os.path.isdir(v) and same_folder(trained[k], v))]
    if changed and master:  # allowed, but a resumed run is then not the run it continues
        inputs = [c for c in changed if c.split()[0] in CACHE_SETTINGS]  # other text embeddings or latents
        print(f"{'warning' if inputs else 'note'}: resuming with changed settings: {', '.join(changed)}"
              + (" (the model was trained on other text embeddings or latents)" if inputs else ""))
    step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
    saved_world = ckpt.get("world_size", world)
    if "world_size" not in ckpt and world > 1 and master:
        print("note: the checkpoint does not say how many processes wrote it (older code): if not "
              f"{world}, part of this epoch is repeated or skipped")
    if saved_world != world:  # batch_in_epoch counts one rank's batches: rescale it to the new ranks'
        batch_in_epoch = batch_in_epoch * saved_world // world
        if master:
            print(f"note: resuming a {saved_world}-process run with {world}: the epoch goes on at batch "
                  f"{batch_in_epoch * world} of its shared batch list")
    rng_ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]  # each rank's noise/t stream (rank 0's: older runs)
    if saved_world == world and rank < len(rng_ranks):
        restored = set_rng_state(rng_ranks[rank], gen)
        if not restored and master:
            print(f"note: {resume_path} was written on another kind of device: the noise and t streams start afresh")
    else:  # no saved stream for this rank: one of its own, never a copy of rank 0's
        set_rng_state(ckpt["rng"], gen)
        restored = False
    if not restored:
        gen.manual_seed(((cfg.seed * 1000 + rank) * 1_000_003 + step) % 2 ** 63)
    if isinstance(ckpt.get("loss_scale"), dict):  # fp16: go on with the scale it had found
        loss_scale.load_state_dict(ckpt["loss_scale"])
    if master:
        print(f"resumed from {resume_path} at step {step}")
        for later in set_aside_later_checkpoints(cfg, step):
            print(f"warning: {later}: a later step than the one resumed, renamed {later}.abandoned")
    return step, epoch, batch_in_epoch
