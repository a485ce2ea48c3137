"""The training loop of every method, top to bottom in one place.

The trainer knows methods only through :class:`fsmis.engine.method.Method`: it asks the method for
its parameter groups, micro-batches, loss and state, and does the rest itself (AdamW, learning-rate
schedule, gradient accumulation and clipping, mixed precision, EMA, DDP, TensorBoard, atomic
checkpoints, exact resume, validation and best-checkpoint selection).

Randomness is counter-based: the generator handed to ``method.loss`` for micro-batch m of
optimiser step s on rank r is seeded by (seed, s, m, r), and so are the engine-side episode
streams of the methods that use them. A resumed run therefore needs only the weights, the
optimiser, the EMA and any stateful streams a method declares (:meth:`Method.rng_state`) to
continue exactly (on CPU, to the bit) as an uninterrupted run with the same seed.

Multi-GPU: launch with ``torchrun --nproc_per_node N train.py ...``; each rank draws its own
micro-batches, gradients are averaged by DistributedDataParallel, rank 0 writes checkpoints and logs.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_json
from ..config import Config, save_config
from . import checkpoints as ck
from .method import method_with_data
from .runs import data_changes, environment, read_data_identity


# -- helpers ------------------------------------------------------------------------------------
def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"train.precision={precision!r} (fp32 | bf16 | fp16)")
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(groups: list[dict], train_cfg, device: torch.device) -> torch.optim.Optimizer:
    """``train.optimizer`` over the method's groups (each with its ``lr``; kept as ``base_lr`` for the
    schedule): AdamW (default; on CUDA the fused kernel, ``train.fused_optimizer``, CPU never) or SGD
    with ``train.momentum`` (the prototype baselines' released recipes)."""
    groups = [dict(g, base_lr=g["lr"]) for g in groups]
    fused = train_cfg.fused_optimizer and device.type == "cuda"
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=train_cfg.momentum,
                               weight_decay=train_cfg.weight_decay)
    if train_cfg.optimizer != "adamw":
        raise ValueError(f"train.optimizer={train_cfg.optimizer!r} (adamw | sgd)")
    return torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                             **({"fused": True} if fused else {}))


def learning_rate(train_cfg, step: int, base: float) -> float:
    """The learning rate of optimiser step ``step`` (0-based) for a group whose peak is ``base``.

    ``linear``: base · (1 − step / max_steps), the released recipe; ``constant``; ``warmup_cosine``:
    linear warm-up over ``warmup_steps``, then cosine to ``final_lr_ratio`` · base; ``step``: base ·
    lr_gamma^k after k of the milestones lr_step_every, 2·lr_step_every, ... below max_steps (the
    MultiStepLR of the prototype baselines: milestones (i + 1)·1000 for i < max_steps // 1000 − 1)."""
    kind, n = train_cfg.schedule, max(1, train_cfg.max_steps)
    if kind == "linear":
        return base * max(0.0, 1.0 - step / n)
    if kind == "constant":
        return base
    if kind == "warmup_cosine":
        warm = max(1, int(train_cfg.warmup_steps))
        if step < warm:
            return base * (step + 1) / warm
        t = (step - warm) / max(1, n - warm)
        r = train_cfg.final_lr_ratio
        return base * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * t)))
    if kind == "step":
        every = max(1, int(train_cfg.lr_step_every))
        return base * train_cfg.lr_gamma ** min(step // every, max(0, n // every - 1))
    raise ValueError(f"train.schedule={kind!r} (linear | constant | warmup_cosine | step)")


class EMA:
    """Exponential moving average of the trained tensors (kept in fp32)."""

    def __init__(self, state: dict, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in state.items()}

    @torch.no_grad()
    def update(self, state: dict):
        for k, v in state.items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.float(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)


def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class _LossModule(torch.nn.Module):
    """DDP needs a module whose forward is the loss: this one wraps the method's."""

    def __init__(self, method):
        super().__init__()
        self.module = method.module
        self._method = [method]  # not a submodule

    def forward(self, batch, generator):
        return self._method[0].loss(batch, generator)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, device: str | None = None, progress: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.dist = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.dist and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
        self.rank = torch.distributed.get_rank() if self.dist else 0
        self.world = torch.distributed.get_world_size() if self.dist else 1
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.dist and self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # collectives use the current device
        self.is_main = self.rank == 0

    # -- set-up ------------------------------------------------------------------------------
    def setup(self):
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        # TF32 matmuls on CUDA (no effect on a CPU): off by default (exact fp32), on as released
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.train.tf32)
        self.method = method_with_data(cfg, self.device, self.rank, self.world)
        self.method.build()
        self.model = self.method.module
        self.model.to(self.device)
        self.optimizer = make_optimizer(self.method.param_groups(), cfg.train, self.device)
        self.ema = EMA(self.method.trained_state(), cfg.train.ema) if cfg.train.ema > 0 else None
        self.scaler = (torch.amp.GradScaler("cuda") if (cfg.train.precision == "fp16" and self.device.type == "cuda")
                       else None)
        self.ddp = None
        if self.dist:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                _LossModule(self.method), device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step = 0
        self.best = -1.0
        self.history: list[dict] = []
        return self

    def resume(self) -> int:
        """Load the newest complete checkpoint of the run folder (holding RUN_DIR/.lock on the main
        process, so a second training cannot remove a checkpoint the first is writing); returns
        its step (0: nothing to resume)."""
        if not (self.is_main and self.run_dir.is_dir()):
            return self._resume()
        from ..atomic import exclusive_lock

        with exclusive_lock(self.run_dir, "run folder"):
            return self._resume()

    def _resume(self) -> int:
        if self.is_main:
            ck.clean_partial(self.run_dir)
        step_dir = ck.last_complete(self.run_dir)
        if step_dir is None:
            return 0
        changed = data_changes(read_data_identity(self.run_dir), self.method.data_identity())
        if changed:
            raise ck.CheckpointError(
                f"{self.run_dir}: its checkpoints were trained on other data than this config gives now "
                f"({'; '.join(changed)}); resuming would mix two datasets in one run: train into a new run folder")
        state = ck.load_checkpoint(step_dir)
        frozen = ck.load_frozen(self.run_dir)
        if frozen is not None:
            self.method.load_frozen_state(frozen, str(self.run_dir / ck.FROZEN_NAME))
        self.method.load_trained_state(state["model"], str(step_dir))
        base = [g["base_lr"] for g in self.optimizer.param_groups]
        ck.restore_optimizer(self.optimizer, state)
        for g, b in zip(self.optimizer.param_groups, base):
            g.setdefault("base_lr", b)  # checkpoints written before the schedule kept it
        if self.ema is not None and "ema" in state:
            for k, v in state["ema"].items():
                self.ema.shadow[k].copy_(v)
        saved = state["state"]
        ranks = saved.get("rng_ranks") or [saved.get("rng", {})]
        if any(ranks) and len(ranks) != self.world:
            raise ck.CheckpointError(f"{step_dir}: saved by {len(ranks)} process(es), resumed with {self.world}: "
                                     "this method's random streams are per process; resume with the same count")
        self.method.load_rng_state(ranks[self.rank] if len(ranks) > self.rank else {})
        self.step = int(state["state"]["step"])
        self.best = float(state["state"].get("best", -1.0))
        self.history = list(state["state"].get("history", []))
        return self.step

    # -- one optimiser step ----------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        self.model.train()
        lrs = []
        for g in self.optimizer.param_groups:
            g["lr"] = learning_rate(cfg.train, self.step, g["base_lr"])
            lrs.append(g["lr"])
        total = 0.0
        for micro in range(cfg.train.grad_accum):
            batch = self.method.batch(self.step, micro)
            gen = torch.Generator(device=self.device).manual_seed(seed_of(cfg.train.seed, self.step, micro,
                                                                          self.rank, 7))
            sync = (self.ddp.no_sync() if (self.ddp is not None and micro < cfg.train.grad_accum - 1)
                    else contextlib.nullcontext())
            with sync:
                with autocast(cfg.train.precision, self.device):
                    loss = self.ddp(batch, gen) if self.ddp is not None else self.method.loss(batch, gen)
                scaled = loss / cfg.train.grad_accum if cfg.train.grad_accum > 1 else loss
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += float(loss.detach())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        gnorm = None
        if cfg.train.clip_grad and cfg.train.clip_grad > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_grad))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.method.trained_state())
        self.step += 1
        stats = {"loss": total / cfg.train.grad_accum, "lr": lrs[0]}
        if gnorm is not None:
            stats["grad_norm"] = gnorm
        return stats

    # -- validation and checkpoints ----------------------------------------------------------------
    def validate(self) -> float | None:
        """The method's validation score, of the EMA weights when EMA is on (they are the weights a
        loaded run predicts with, so the best checkpoint is chosen on them); the live weights are
        put back bit for bit afterwards."""
        if self.ema is None:
            return self.method.validate()
        live = self.method.trained_state()
        backup = {k: v.detach().clone() for k, v in live.items()}
        try:
            with torch.no_grad():
                for k, v in live.items():
                    v.copy_(self.ema.shadow[k].to(v.dtype))
            return self.method.validate()
        finally:
            with torch.no_grad():
                for k, v in live.items():
                    v.copy_(backup[k])

    def _rng_states(self) -> list:
        """Every rank's stateful random streams (a collective call under DDP)."""
        own = self.method.rng_state()
        if not self.dist:
            return [own]
        states = [None] * self.world
        torch.distributed.all_gather_object(states, own)
        return states

    def save(self, val_dice: float | None = None, best: bool = False, rng_states: list | None = None):
        rng_states = rng_states if rng_states is not None else [self.method.rng_state()]
        extra = {"best": self.best, "history": self.history, "val_dice": val_dice, "method": self.cfg.method,
                 "seed": self.cfg.train.seed, "rng": rng_states[0], "world_size": self.world}
        if len(rng_states) > 1:
            extra["rng_ranks"] = rng_states
        if hasattr(self.cfg.data, "fold"):
            extra["fold"] = self.cfg.data.fold
        return ck.save_checkpoint(self.run_dir, self.step, self.method.trained_state(), self.optimizer,
                                  None, self.ema.shadow if self.ema else None, extra, best=best,
                                  keep_last=self.cfg.train.keep_last)

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``max_steps`` (holding RUN_DIR/.lock on the main process: two trainings never
        write into one run folder)."""
        if not self.is_main:
            return self._fit()
        from ..atomic import exclusive_lock

        existed = self.run_dir.exists()
        fresh = not existed or all(p.name == ".lock" for p in self.run_dir.iterdir())
        with exclusive_lock(self.run_dir, "run folder"):
            try:
                return self._fit()
            except BaseException:
                # a new run that fails (bad data, Ctrl-C) before its first checkpoint leaves nothing
                # behind: there is nothing to resume
                if fresh and ck.last_complete(self.run_dir) is None:
                    self._remove_unstarted(existed)
                raise

    def _remove_unstarted(self, existed: bool) -> None:
        import shutil

        if not existed:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return
        for p in self.run_dir.iterdir():
            if p.name != ".lock":
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _fit(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        writer = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            if not (self.run_dir / ck.FROZEN_NAME).is_file():
                ck.save_frozen(self.run_dir, self.method.frozen_state())
            identity = self.method.data_identity()
            if identity is not None:
                from .runs import DATA_NAME

                atomic_write_json(self.run_dir / DATA_NAME, identity)
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc=f"train {cfg.name}",
                   unit="step", disable=not (self.progress and self.is_main))
        t0 = time.time()
        spent = {"validation": 0.0, "checkpoints": 0.0}  # seconds inside validate() and save()
        step_times = []
        try:
            while self.step < cfg.train.max_steps:
                ts = time.time()
                stats = self.train_step()
                step_times.append(time.time() - ts)
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
                if writer is not None and (self.step % cfg.train.log_every == 0 or self.step == 1):
                    for k, v in stats.items():
                        writer.add_scalar(f"train/{k}", v, self.step)
                    for k, v in self.method.scalars(self.step).items():
                        writer.add_scalar(k, v, self.step)
                if writer is not None and cfg.train.image_every and self.step % cfg.train.image_every == 0:
                    image = self.method.preview(self.step)
                    if image is not None:
                        writer.add_image("preview", image.cpu(), self.step)
                val_due = cfg.train.val_every and self.step % cfg.train.val_every == 0
                ckpt_due = self.step % cfg.train.ckpt_every == 0 or self.step == cfg.train.max_steps
                val_dice, is_best = None, False
                if val_due or (ckpt_due and self.step == cfg.train.max_steps):
                    tv = time.time()
                    val_dice = self.validate() if self.is_main else None
                    spent["validation"] += time.time() - tv
                    if val_dice is not None:
                        is_best = val_dice > self.best
                        self.best = max(self.best, val_dice)
                        self.history.append({"step": self.step, "val_dice": val_dice})
                        if writer is not None:
                            writer.add_scalar("val/dice", val_dice, self.step)
                if self.dist:  # every rank learns whether rank 0 saves (best depends on its validation)
                    flag = torch.tensor([int(ckpt_due or is_best)], device=self.device)
                    torch.distributed.broadcast(flag, 0)
                    save_now = bool(flag.item())
                else:
                    save_now = ckpt_due or is_best
                if save_now:
                    rng_states = self._rng_states()
                    if self.is_main:
                        tc = time.time()
                        self.save(val_dice, best=is_best, rng_states=rng_states)
                        spent["checkpoints"] += time.time() - tc
                if self.dist:
                    torch.distributed.barrier()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        summary = {"method": cfg.method, "steps": self.step, "seconds": round(time.time() - t0, 1),
                   "seconds_validation": round(spent["validation"], 2),
                   "seconds_checkpoints": round(spent["checkpoints"], 2),
                   # the steady state: the mean step over the second half of this session's steps (warm-up,
                   # validation and checkpoints excluded)
                   "seconds_per_step": (round(sum(step_times[len(step_times) // 2:])
                                              / len(step_times[len(step_times) // 2:]), 5) if step_times else None),
                   "best_val_dice": self.best, "history": self.history, "index": ck.read_index(self.run_dir),
                   "environment": environment(self.device), **self.method.summary_facts(self.step)}
        if self.is_main:
            summary["exported"] = [str(p) for p in self.method.finalize(self.run_dir, summary)]
            atomic_write_json(self.run_dir / "train_summary.json", summary)
        return summary


def train_folds(cfg: Config, out: Path, folds, device=None, progress=True) -> dict:
    """Train one model per fold into out/fold<k>/ (one command for all 5 folds)."""
    if not hasattr(cfg.data, "fold"):
        raise ValueError(f"method {cfg.method!r} has no folds (data.fold)")
    results = {}
    for k in folds:
        c = copy.deepcopy(cfg)
        c.data.fold = int(k)
        tr = Trainer(c, out / f"fold{k}", device, progress).setup()
        tr.resume()
        results[k] = tr.fit()
    return results


__all__ = ["Trainer", "train_folds", "EMA", "autocast", "make_optimizer", "learning_rate", "seed_of"]
