"""Train the single-stream DiT with rectified flow matching on a cached data set.

    python train.py                                  # embedded default: shapes, pixel space, CPU
    python train.py flowers batch_size=8             # a preset + key=value overrides (config.py)
    python train.py resume=auto                      # continue the latest checkpoint of the run
    torchrun --nproc_per_node=2 train.py flowers     # DDP; effective batch = batch_size*grad_accum*N

Everything a run writes lives in runs/<run_name>/: config.json, log.csv, val.csv, samples/,
checkpoints/, model/ (the exported EMA weights for sample.py and the notebook) and the graphs.
A checkpoint holds model, EMA, optimiser, step, epoch, batch position, RNG states and config; the
learning-rate schedule is a function of the step (lr_at), so the step restores it exactly. With
max_minutes set, a run too slow to reach max_steps in time anneals on the clock instead (lr_at's
time_frac), so a time-cut run still ends at the low learning rate.
"""
import os
import random
import signal
import time
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

from config import (Config, ConfigError, another_process_ended, exit_process, main_guard, parse_args, resolve_device,
                    to_dict)
from cache import CacheError
from checkpoint import (check_resume_fits, checkpoint_dir, load_resume_checkpoint, lock_run, resume_run, rng_state,
                        save_checkpoint, set_aside_earlier_run, step_files, unlock_run, write_json)
from objective import flow_matching_loss
from metrics import LOG_COLUMNS, VAL_COLUMNS, CSVLog, RunningStats, default_val_prompts, validation_loss
from optim import LossScale, adamw8bit_class, lr_at, make_optimizer, optimizer_update
from runtime import (PROCESS_GROUP_TIMEOUT, allow_tf32, autocast_for, compile_for_training, peak_memory_mb,
                     precision_for, setup_distributed, to_device, triton_installed, use_compile)


def out_of_memory_advice(cfg: Config, shape, device) -> str:
    """One line for a training step that ran out of memory: where, and the settings that lower the need."""
    B, _, h, w = shape
    f = cfg.vae_downsample
    hints = [f"batch_size={max(1, cfg.batch_size // 2)} grad_accum={cfg.grad_accum * 2} (the same effective batch)"]
    if not cfg.grad_checkpointing:
        hints.append("grad_checkpointing=true")
    if cfg.optimizer != "adamw8bit":
        hints.append("optimizer=adamw8bit")
    return (f"out of memory on {device} in a step of {B} images at {w * f}x{h * f} (bucket of "
            f"target_resolution={cfg.target_resolution}): try " + ", or ".join(hints))


# a step that cannot complete stops the run: the last completed step is checkpointed and the model exported, then
# one line (CacheError or ConfigError) says why; resume=auto runs the step again
FAULTS = {"batch": ("a batch could not be loaded", CacheError), "memory": ("out of memory", ConfigError),
          "peer": ("a process of the job ended", ConfigError)}


def lost_process(e: Exception, master: bool):
    """Under torchrun, a collective that failed because another process of the job ended (killed, out of
    memory, an error of its own): one line for rank 0, which then checkpoints the last completed step and
    exports; the other ranks (which write nothing) stop with it. Any other error: None (raise it)."""
    why = another_process_ended(e)
    if why and not master:
        raise ConfigError(why) from None
    return why


def check_settings(cfg: Config, say=print):
    """Settings that cannot train (a one-line error before any work) or that train something else than meant
    (a warning)."""
    if cfg.hflip and cfg.data_source == "shapes":  # 4 of its 5 positions are a side: half the flips contradict
        raise ConfigError("hflip=True: the shapes captions say left and right (\"top left\"), so a flipped image "
                          "contradicts its caption; hflip is for data whose captions do not")
    if cfg.optimizer == "adamw8bit":
        adamw8bit_class()  # bitsandbytes missing: a one-line error now, not after the data work
    if cfg.warmup_steps >= cfg.max_steps:  # lr_at never gets past the warmup
        say(f"warning: warmup_steps={cfg.warmup_steps} >= max_steps={cfg.max_steps}: the learning rate ends at "
            f"{lr_at(cfg.max_steps - 1, cfg):.2e} still warming up, without the decay to min_lr_ratio (nor the "
            "max_minutes anneal)")
    if cfg.caption_dropout == 0 and cfg.cfg_scale != 1:  # the null caption then keeps its random init
        say(f"warning: caption_dropout=0 does not train the null caption that cfg_scale={cfg.cfg_scale} guides "
            "from (sample grids, sample.py, evaluate.py): give caption_dropout > 0 (e.g. 0.1) or cfg_scale=1")


def open_run_folder(cfg: Config, manifest: dict, resumed_at, gate_names: list) -> tuple:
    """runs/<run_name>/ of a run that starts (or resumes at step resumed_at): config.json, the latent statistics
    (sampling uses them later, whatever happens to the cache) and the CSV logs (log, val), without the rows of
    steps after resumed_at (written after its checkpoint: they are trained again)."""
    from latents import LATENT_STATS
    os.makedirs(os.path.join(cfg.run_dir, "samples"), exist_ok=True)
    write_json(os.path.join(cfg.run_dir, "config.json"), to_dict(cfg))
    if cfg.latent_norm:
        write_json(os.path.join(cfg.run_dir, LATENT_STATS),
                   {k: manifest[k] for k in ("latent_mean", "latent_std", "scale", "shift")})
    return (CSVLog(os.path.join(cfg.run_dir, "log.csv"), resumed_at, LOG_COLUMNS + [f"gate_{n}" for n in gate_names]),
            CSVLog(os.path.join(cfg.run_dir, "val.csv"), resumed_at, VAL_COLUMNS))


def train(cfg: Config) -> dict:
    """Train as cfg says (under torchrun: on every rank); returns {'status', 'step', 'run_dir', 'diverged'}. The run
    folder is locked meanwhile: a second train.py on it stops with a one-line error."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGCHLD", None))
                if sig is not None}
    lock = lock_run(cfg) if int(os.environ.get("RANK", 0)) == 0 else None
    try:
        return run_training(cfg)
    finally:  # train() called from Python: its signals as they were, also after an error
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        unlock_run(lock)


def run_training(cfg: Config) -> dict:
    from dataset import BatchStream, loading_failure, make_loader
    from latents import LatentSpace
    from model import DiTConfig, SingleStreamDiT
    from preprocess import ensure_cache, raise_interrupt
    from sample import encode_prompts, generate, save_grid
    import generate_graph

    rank, world, device = setup_distributed()
    device = device or resolve_device(cfg.device)
    master = rank == 0
    allow_tf32()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    say = print if master else lambda *a, **k: None  # every rank checks; rank 0 reports
    check_settings(cfg, say)
    # first: a bad resume= fails before any work
    resume_path, ckpt = load_resume_checkpoint(cfg, say=say)
    if resume_path:
        check_resume_fits(cfg, resume_path, ckpt)
    if master and resume_path is None:
        moved = set_aside_earlier_run(cfg.run_dir)
        if cfg.resume == "auto":
            print(f"resume=auto: no readable checkpoint in {checkpoint_dir(cfg)}: starting fresh"
                  + (f" (what the folder held is moved to {moved})" if moved else ""))
        elif moved:
            print(f"{cfg.run_dir} held an earlier run: moved to {moved} (resume=auto continues a run instead)")

    # --- data: build or refresh the cache (under torchrun every rank encodes a share), then loaders over it ---
    # compiled: full batches only (each bucket's short last batch is dropped), so one graph per bucket
    compiled = use_compile(cfg, device)  # (compile=on without Triton on a GPU: one line before any data work)
    signal.signal(signal.SIGTERM, raise_interrupt)  # like Ctrl-C: the images encoded so far stay cached
    manifest = ensure_cache(cfg, distributed=world > 1)  # each rank encodes its share: none waits on rank 0
    if master and cfg.compile == "auto" and device.type == "cuda" and not compiled and not triton_installed():
        print("note: compile=auto trains without torch.compile: Triton is not installed (pip install triton, "
              "or triton-windows on Windows)")
    loader, batch_sampler, train_set = make_loader(cfg, "train", rank, world, drop_last=compiled)
    if compiled and len(batch_sampler) == 0:  # every bucket holds less than one batch: keep short ones
        loader, batch_sampler, train_set = make_loader(cfg, "train", rank, world)
    val_loader = None
    if master and cfg.val_fraction > 0:
        val_loader, _, val_set = make_loader(cfg, "val")
        val_loader = val_loader if len(val_set) > 0 else None
    if len(train_set) == 0:
        raise ConfigError(f"cache_dir={cfg.cache_dir}: no training samples (every image was skipped, or "
                          "val_fraction left none)")

    # --- model, EMA, optimiser ---
    model = SingleStreamDiT(DiTConfig.from_config(cfg)).to(device)
    ema_model = SingleStreamDiT(DiTConfig.from_config(cfg)).to(device).requires_grad_(False)
    ema_model.load_state_dict(model.state_dict())
    trained = (ckpt.get("config") or {}) if resume_path else {}
    same_optimizer = trained.get("optimizer", cfg.optimizer) == cfg.optimizer
    optimizer = make_optimizer(model, cfg, ckpt.get("optimizer") if resume_path and same_optimizer else None)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    loss_scale = LossScale(device, enabled=precision_for(cfg, device) == torch.float16)
    step, epoch, batch_in_epoch = 0, 0, 0

    if resume_path:
        step, epoch, batch_in_epoch = resume_run(cfg, resume_path, ckpt, model, ema_model, optimizer, loss_scale,
                                                 gen, rank, world)

    # train_model (compiled, DDP-wrapped) runs forward and backward; model holds the same weights, unwrapped, for
    # clipping, the optimiser, the EMA and checkpoints
    train_model = compile_for_training(model, cfg, device)
    host_group = None  # the collectives on host values: the default group unless that one is NCCL (GPU only)
    if world > 1:
        if dist.get_backend() == "nccl":
            host_group = dist.new_group(backend="gloo", timeout=PROCESS_GROUP_TIMEOUT)
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
        # the depthwise conv's weight gradient has another stride on its size-1 dimension: the same layout
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

    # --- run folder (rank 0 writes everything) and what the sample grids need ---
    log = val_log = None
    if master:
        log, val_log = open_run_folder(cfg, manifest, step if resume_path else None,
                                       sorted(model.fourier_gate_stats()))
        prompts = default_val_prompts(cfg, val_set if val_loader else None)
        prompt_emb = encode_prompts(cfg, prompts, device)  # encoded once, encoder freed
        latent_space = LatentSpace.from_config(cfg, device=device, stats=manifest)

    def validate_and_sample(step):
        """Validation loss and sample grids; what cannot be done (out of memory, a damaged held-out file) is
        skipped with a warning: it never costs the run, or the checkpoint that follows."""
        try:
            row = validation_loss(ema_model, val_loader, cfg, device)
        except Exception as e:  # a damaged held-out cache file, a DataLoader worker ended or killed
            why = "out of memory" if isinstance(e, torch.OutOfMemoryError) else loading_failure(e)
            if why is None:
                raise
            row = None
            tqdm.write(f"warning: step {step}: validation loss skipped: {why}")
        if row:
            val_log.write({"step": step, **row})
        for tag, m in (("ema", ema_model), ("raw", model)):
            m.eval()
            try:
                with autocast_for(cfg, device):
                    images = generate(m, latent_space, prompt_emb, cfg, seed=cfg.seed)
            except torch.OutOfMemoryError:
                tqdm.write(f"warning: step {step}: {tag} sample grid skipped: out of memory (fewer val_prompts "
                           "need less)")
                continue
            finally:
                m.train()
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # what sampling cached goes back to training
            path = os.path.join(cfg.run_dir, "samples", f"step_{step:07d}_{tag}.png")
            try:
                save_grid(images, prompts, path)
            except OSError as e:  # a full disk costs a sample grid, not the run
                tqdm.write(f"warning: {path}: not written ({e})")
        return row

    # --- Ctrl-C / SIGTERM: finish the step, save, exit cleanly ---
    # "received": the signal this process got; "signal": the one the ranks agree on at the end of the step
    stop = {"received": None, "count": 0, "signal": None}

    def on_signal(signum, frame):
        stop["count"] += 1
        if stop["count"] > 1:  # second Ctrl-C: give up immediately
            if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun forwards the job's signal: the same request;
                return  # its --shutdown_timeout (then SIGKILL) is the hard stop
            raise KeyboardInterrupt
        stop["received"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    def checkpoint_state(rng_ranks=None):
        return {"world_size": world, "rng_ranks": rng_ranks, "model": model.state_dict(), "ema": ema_model.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "epoch": stream.epoch,
                "batch_in_epoch": stream.position, "rng": rng_state(gen), "config": to_dict(cfg),
                "loss_scale": loss_scale.state_dict() if loss_scale.enabled else None,
                "train_seconds": time.time() - t_start}

    # --- the training loop ---
    model.train()
    # the clock of max_minutes goes on from the checkpoint's (else a resumed run's lr would jump back up)
    t_start = time.time() - (ckpt.get("train_seconds", 0.0) if resume_path else 0.0)
    time_frac = (time.time() - t_start) / 60 / cfg.max_minutes if cfg.max_minutes > 0 else 0.0
    t_log, images_since_log = time.time(), 0
    stats = RunningStats(device)  # the losses and skipped steps since the last log line, on the device
    status, unsaved, diverged = "done", None, False  # unsaved: why the last checkpoint could not be written
    fault = None  # (a FAULTS kind, one line): why a step could not complete

    def all_ranks(collective, *args, **kwargs):
        """collective(*args, **kwargs) over the ranks: None, or the fault of its failure (lost_process)."""
        try:
            collective(*args, **kwargs)
        except RuntimeError as e:
            why = lost_process(e, master)
            if why is None:
                raise
            return "peer", why

    stream = BatchStream(loader, epoch, batch_in_epoch)  # (a resume goes on mid-epoch)
    if cfg.num_workers > 0 and hasattr(signal, "SIGCHLD"):
        # PyTorch's SIGCHLD handler raises wherever the main thread is when a worker dies (e.g. killed for
        # memory): mid-backward or mid-update. Without it the death shows in next() (within 5 s), where a
        # batch that cannot be loaded is handled: checkpoint of the last completed step, one line.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master, desc="train", dynamic_ncols=True)
    # a resume of a run that used up its max_minutes trains no step (the same on every rank: the checkpoint's)
    out_of_time = bool(resume_path) and 0 < cfg.max_minutes <= ckpt.get("train_seconds", 0.0) / 60
    if out_of_time:
        status = f"max_minutes={cfg.max_minutes} was used up at step {step} (give a larger one to train on)"
    while step < cfg.max_steps and not out_of_time:
        last_step = step + 1 == cfg.max_steps
        lr = lr_at(step, cfg, time_frac)
        for g in optimizer.param_groups:
            g["lr"] = lr

        # step: grad_accum micro-batches, then clip, check, update, EMA
        optimizer.zero_grad(set_to_none=True)
        # "fraction of training" as lr_at counts it: by the clock too, where max_minutes comes first
        use_consistency = cfg.self_consistency_loss > 0 and \
            max(step, time_frac * cfg.max_steps) >= cfg.self_consistency_start * cfg.max_steps
        loss_ok = torch.ones((), device=device) if loss_scale.enabled else None  # fp16: was every loss finite?
        # where a resume goes on if this step cannot load its batches (and the noise it draws again)
        step_start = (stream.epoch, stream.position)
        gen_start = gen.get_state()  # (a forward that runs out of memory has drawn its noise and t already)
        for micro in range(cfg.grad_accum):
            try:
                batch = stream.next()
            except Exception as e:  # a damaged or deleted cache file, a killed DataLoader worker
                why = loading_failure(e)
                if why is None:
                    raise
                if world > 1:  # the other ranks wait in this step's all-reduce: stop the job
                    raise CacheError(why) from None
                fault = "batch", why
                break
            batch = to_device(batch, device, cfg.trim_text)
            sync = world == 1 or micro == cfg.grad_accum - 1
            try:
                with (nullcontext() if sync else train_model.no_sync()), autocast_for(cfg, device):
                    loss, per_sample, t = flow_matching_loss(train_model, batch, cfg, gen,
                                                             ema_model if use_consistency else None)
                loss_scale.backward(loss / cfg.grad_accum)
            except torch.OutOfMemoryError:  # the weights are untouched: save the last completed step, say what to do
                fault = "memory", out_of_memory_advice(cfg, batch["latents"].shape, device)
                if world > 1:  # the other ranks wait in this step's all-reduce: stop the job
                    raise ConfigError(fault[1]) from None
                loss = per_sample = batch = None
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                break
            except RuntimeError as e:  # under torchrun: DDP's all-reduce found another process gone
                why = lost_process(e, master) if world > 1 else None
                if why is None:
                    raise
                fault = "peer", why
                loss = per_sample = batch = None
                break
            images_since_log += batch["latents"].shape[0] * world
            finite_loss = stats.add_micro_batch(loss, per_sample, t)
            if loss_ok is not None:
                loss_ok = loss_ok * finite_loss
        if world > 1 and loss_scale.enabled and not fault:  # every rank must agree (the scale, max_nonfinite)
            fault = all_ranks(dist.all_reduce, loss_ok, op=dist.ReduceOp.MIN)
        if fault:  # the last completed step is checkpointed below; this one
            stream.epoch, stream.position = step_start  # runs again on resume
            gen.set_state(gen_start)  # this step's noise and t are drawn again
            break
        grad_norm, finite = optimizer_update(model, ema_model, optimizer, cfg, step, loss_scale,
                                             None if loss_ok is None else loss_ok.bool())
        # fp16: a non-finite step while the loss scale is >= 1 (an overflow of loss x scale) only lowers the scale
        stats.add_step(failed=~finite & ~loss_scale.overflow, finite=finite)
        step += 1
        bar.update(1)

        # stop on a signal or the time limit (every rank at the same step)
        if cfg.max_minutes > 0:
            time_frac = (time.time() - t_start) / 60 / cfg.max_minutes
        if world > 1:  # every rank must stop at the same step (and use the same lr), or they diverge
            flags = torch.tensor([stop["received"] or 0, time_frac], dtype=torch.float64)
            fault = all_ranks(dist.all_reduce, flags, op=dist.ReduceOp.MAX, group=host_group)  # on the CPU
            if fault:
                break
            stop["signal"], time_frac = int(flags[0]) or None, float(flags[1])
            if cfg.max_minutes > 0:  # every rank on the agreed clock (the earliest started), so the checkpoint's
                t_start = time.time() - time_frac * cfg.max_minutes * 60  # train_seconds is the one that stopped it
        else:
            stop["signal"] = stop["received"]
        out_of_time = time_frac >= 1.0
        if stop["signal"] is not None:
            status = f"stopped by signal {stop['signal']} at step {step} (checkpoint saved)"
        elif out_of_time:
            status = f"stopped after max_minutes={cfg.max_minutes} at step {step} (checkpoint saved)"
        final = last_step or stop["signal"] is not None or out_of_time

        # log (every rank reads the skip counts: they all stop at the same step); the last step logs the steps
        # since the previous line too
        log_now = step % cfg.log_every == 0 or final
        if log_now:
            n_skipped, n_longest = stats.take_skips()
            if n_skipped and master:
                tqdm.write(f"step {step}: {n_skipped} non-finite loss/gradient step(s) skipped since the last "
                           f"log line ({n_longest} in a row)")
            if n_longest >= cfg.max_nonfinite:
                kept = "last good checkpoint kept" if step_files(checkpoint_dir(cfg)) else "no checkpoint written yet"
                status = f"stopped: {n_longest} non-finite steps in a row ({kept})"
                diverged = True
        if world > 1 and log_now:  # the logged losses are over every rank's samples, not rank 0's
            packed = stats.packed_losses()
            fault = all_ranks(dist.all_reduce, packed)
            if fault:  # this step is done: it is checkpointed below
                break
            stats.unpack_losses(packed)
        if master and log_now:
            elapsed = time.time() - t_log
            row = {"step": step, "epoch": stream.epoch, **stats.loss_columns(), "lr": lr,
                   "grad_norm": grad_norm.item(), "images_per_s": images_since_log / max(elapsed, 1e-9),
                   "nonfinite": n_skipped, "loss_scale": loss_scale.scale.item() if loss_scale.enabled else "",
                   "peak_mem_mb": peak_memory_mb(device),
                   **{f"gate_{name}": value for name, value in model.fourier_gate_stats().items()}}
            log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{row['images_per_s']:.0f}")
            t_log, images_since_log = time.time(), 0
        if log_now:
            stats.new_window()
        if diverged:
            break

        # evaluate / sample (also at the end that the time limit makes: val_every=0 is "end only")
        if master and ((cfg.val_every and step % cfg.val_every == 0) or last_step or out_of_time):
            row = validate_and_sample(step)
            if row:
                tqdm.write(f"step {step}: val_loss {row['val_loss']:.4f}")

        # checkpoint (also on a signal or the time limit)
        rng_ranks = None
        if world > 1 and (step % cfg.checkpoint_every == 0 or final):  # the same steps on every rank
            rng_ranks = [None] * world
            fault = all_ranks(dist.all_gather_object, rng_ranks, rng_state(gen), group=host_group)
            if fault:
                break
        if master and (step % cfg.checkpoint_every == 0 or final):
            try:
                save_checkpoint(cfg, checkpoint_state(rng_ranks), say=tqdm.write)
            except OSError as e:  # e.g. a full disk: train on, try again at the next checkpoint
                unsaved = str(e)
                tqdm.write(f"warning: {e}; " + ("exporting the model" if final else "training goes on"))
            else:
                unsaved = None
        if stop["signal"] is not None or out_of_time:
            break
    bar.close()
    # the step could not load its batch, ran out of memory or lost a process of the job: the last completed step
    # is checkpointed (this one runs again on resume)
    if fault:
        status = f"stopped at step {step}: {FAULTS[fault[0]][0]}"
        if fault[0] == "batch" and stop["received"] is None:  # a signal to the process group may end a DataLoader
            time.sleep(1)  # worker before this process handles its own: a moment for it
        if fault[0] == "batch" and stop["received"] is not None:  # a worker ended by the same signal: a stop
            fault, status = None, f"stopped by signal {stop['received']} at step {step} (checkpoint saved)"
        if master:
            try:
                save_checkpoint(cfg, checkpoint_state(), say=tqdm.write)
            except OSError as e:
                unsaved = str(e)
    # --- export the EMA model, draw the graphs (a signal meanwhile, e.g. torchrun passing on the job's
    # SIGTERM, is one more request to stop: the export goes on; train() restores the handlers) ---
    if master:
        ema_model.save_pretrained(os.path.join(cfg.run_dir, "model"), step=step)  # a failure: one line, exit 2
        if unsaved:  # the model is exported, but the run cannot resume from this step
            raise OSError(f"{unsaved}: the EMA model is in {cfg.run_dir}/model, resume would restart from the "
                          "last checkpoint written")
        if fault:  # (peer: the other ranks' noise streams are not in the checkpoint; a resume starts them afresh)
            kind, why = fault
            raise FAULTS[kind][1](f"{why} (step {step} is checkpointed: resume=auto goes on from it)")
        try:
            generate_graph.make_graphs(cfg.run_dir)
        except Exception as e:  # graphs are a convenience; never lose a run over them
            print(f"warning: graphs not drawn: {e}")
        minutes = (time.time() - t_start) / 60
        print(f"{status}: {step} steps in {minutes:.1f} min -> {cfg.run_dir}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"status": status, "step": step, "run_dir": cfg.run_dir, "diverged": diverged}


if __name__ == "__main__":
    result = main_guard(lambda: train(parse_args()))
    exit_process(1 if result["diverged"] else 0)  # a run stopped by non-finite losses: scripts can tell
