"""Episodic training of SD-FSMIS, top to bottom in one loop.

Randomness is counter-based: the episodes and the VAE posterior noise of micro-batch m of
optimiser step s on rank r are drawn from generators seeded by (seed, s, m, r). A resumed run
therefore needs only the weights, optimiser, scheduler and EMA state to continue exactly
(on CPU, to the bit) as an uninterrupted run with the same seed.

Multi-GPU: launch with ``torchrun --nproc_per_node N train.py ...``; each rank samples its own
episodes, gradients are averaged by DistributedDataParallel, rank 0 writes checkpoints and logs.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config, save_config
from ..data.datasets import open_dataset
from ..data.episodes import ConsecutiveSliceSampler
from ..data.folds import make_folds, split_validation
from ..evaluation.results import atomic_write_json
from ..models.sd_fsmis import Batch
from . import checkpoints as ck


# -- data -----------------------------------------------------------------------------------------
def fold_split(cfg: Config, dataset):
    folds = make_folds(dataset.case_ids, cfg.data.protocol, cfg.data.supp_idx)
    if not 0 <= cfg.data.fold < len(folds):
        raise ValueError(f"data.fold={cfg.data.fold} out of range 0..{len(folds) - 1}")
    fold = folds[cfg.data.fold]
    train, val = split_validation(fold.train, fold.support, cfg.data.n_val)
    return fold, train, val


def make_sampler(cfg: Config, dataset, train_cases):
    return ConsecutiveSliceSampler(
        dataset, train_cases, n_shot=1, setting=cfg.data.setting, exclusion=cfg.data.exclusion,
        labels=cfg.data.labels, min_fg_pixels=cfg.data.min_fg_pixels,
        augment="default" if cfg.data.augment else None, normalization="minmax", seed=cfg.train.seed)


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def collate(episodes, image_size: int, shift_px: int = 0, rng: np.random.Generator | None = None) -> Batch:
    """Episodes (numpy) -> a Batch of B episodes with K shots and one query each."""
    s_img = torch.from_numpy(np.concatenate([e.support_images for e in episodes]))[:, None]
    s_msk = torch.from_numpy(np.concatenate([e.support_masks for e in episodes]))[:, None]
    q_img = torch.from_numpy(np.concatenate([e.query_images for e in episodes]))[:, None]
    q_msk = torch.from_numpy(np.concatenate([e.query_masks for e in episodes]))[:, None]
    s_img, q_img = _resize(s_img, image_size, "bilinear"), _resize(q_img, image_size, "bilinear")
    s_msk, q_msk = _resize(s_msk, image_size, "nearest"), _resize(q_msk, image_size, "nearest")
    if shift_px > 0 and rng is not None:
        # independent random shifts keep the model from copying the support mask's position
        for t_img, t_msk in ((s_img, s_msk), (q_img, q_msk)):
            for i in range(t_img.shape[0]):
                dy, dx = (int(v) for v in rng.integers(-shift_px, shift_px + 1, size=2))
                t_img[i] = _shift(t_img[i], dy, dx)
                t_msk[i] = _shift(t_msk[i], dy, dx)
    return Batch(s_img.float(), s_msk.float(), q_img.float(), episodes[0].n_shot, 1, q_msk.float())


# -- helpers ------------------------------------------------------------------------------------
def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"train.precision={precision!r} (fp32 | bf16 | fp16)")
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(model, train_cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW with two groups: UNet (and input convs) at ``lr``, VTCT at ``lr × vtct_lr_mult``.
    On CUDA the fused kernel is used (``train.fused_optimizer``, default true; CPU never)."""
    groups = [{"params": model.unet_parameters(), "lr": train_cfg.lr},
              {"params": model.vtct_parameters(), "lr": train_cfg.lr * train_cfg.vtct_lr_mult}]
    fused = train_cfg.fused_optimizer and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                             **({"fused": True} if fused else {}))


def linear_decay(max_steps: int):
    return lambda step: max(0.0, 1.0 - step / max(1, max_steps))


class EMA:
    """Exponential moving average of the trained tensors (kept in fp32)."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.trainable_state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        for k, v in model.trainable_state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.float(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, device: str | None = None, progress: bool = True,
                 log_fn=print):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.log = log_fn
        self.dist = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.dist and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
        self.rank = torch.distributed.get_rank() if self.dist else 0
        self.world = torch.distributed.get_world_size() if self.dist else 1
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.is_main = self.rank == 0

    # -- set-up ------------------------------------------------------------------------------
    def setup(self):
        from ..models.build import build_model

        cfg = self.cfg
        if cfg.data.root is None:
            raise ValueError("data.root is not set (give data.root=DIR on the command line)")
        torch.manual_seed(cfg.train.seed)
        self.dataset = open_dataset(cfg.data.root)
        self.fold, self.train_cases, self.val_cases = fold_split(cfg, self.dataset)
        self.sampler = make_sampler(cfg, self.dataset, self.train_cases)
        self.model, self.load_report = build_model(cfg.model)
        self.model.to(self.device)
        if cfg.train.grad_checkpointing:
            self.model.unet.enable_gradient_checkpointing()
        self.optimizer = make_optimizer(self.model, cfg.train, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_decay(cfg.train.max_steps))
        self.ema = EMA(self.model, cfg.train.ema) if cfg.train.ema > 0 else None
        self.scaler = torch.amp.GradScaler("cuda") if (cfg.train.precision == "fp16" and self.device.type == "cuda") else None
        self.latent_cache = None
        if cfg.train.cache_latents:
            if cfg.data.augment or cfg.data.shift_px:
                raise ValueError("train.cache_latents=true needs data.augment=false and data.shift_px=0 "
                                 f"(got data.augment={cfg.data.augment}, data.shift_px={cfg.data.shift_px}): "
                                 "augmented or shifted slices never repeat")
            from .latent_cache import LatentCache

            self.latent_cache = LatentCache(self.model)
        self.ddp = None
        if self.dist:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                _LossModule(self.model), device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step = 0
        self.best = -1.0
        self.history: list[dict] = []
        return self

    def resume(self) -> int:
        ck.clean_partial(self.run_dir)
        idx = ck.read_index(self.run_dir)
        if not idx.get("last"):
            return 0
        step_dir = self.run_dir / "checkpoints" / idx["last"]
        state = ck.load_checkpoint(step_dir)
        ck.load_model_state(self.model, state["model"], str(step_dir))
        ck.restore_optimizer(self.optimizer, state)
        self.scheduler.load_state_dict(state["state"]["scheduler"])
        if self.ema is not None and "ema" in state:
            for k, v in state["ema"].items():
                self.ema.shadow[k].copy_(v)
        self.step = int(state["state"]["step"])
        self.best = float(state["state"].get("best", -1.0))
        self.history = list(state["state"].get("history", []))
        return self.step

    # -- one optimiser step ----------------------------------------------------------------------
    def micro_batch(self, step: int, micro: int, with_episodes: bool = False):
        cfg = self.cfg
        rng = np.random.default_rng([cfg.train.seed, step, micro, self.rank])
        episodes = [self.sampler.sample(rng) for _ in range(cfg.train.batch_size)]
        batch = collate(episodes, cfg.data.image_size, cfg.data.shift_px, rng)
        for name in ("support_images", "support_masks", "query_images", "query_masks"):
            setattr(batch, name, getattr(batch, name).to(self.device))
        return (batch, episodes) if with_episodes else batch

    def train_step(self) -> dict:
        cfg = self.cfg
        self.model.train()
        total = 0.0
        for micro in range(cfg.train.grad_accum):
            batch, episodes = self.micro_batch(self.step, micro, with_episodes=True)
            posteriors = None
            if self.latent_cache is not None:
                with autocast(cfg.train.precision, self.device):
                    posteriors = self.latent_cache.batch_posteriors(batch, episodes)
            gen = torch.Generator(device=self.device).manual_seed(_seed_of(cfg.train.seed, self.step, micro, self.rank, 7))
            sync = (self.ddp.no_sync() if (self.ddp is not None and micro < cfg.train.grad_accum - 1)
                    else contextlib.nullcontext())
            with sync:
                with autocast(cfg.train.precision, self.device):
                    loss = (self.ddp(batch, gen, posteriors) if self.ddp is not None
                            else self.model.loss(batch, gen, posteriors))
                scaled = loss / cfg.train.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += float(loss.detach())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_grad)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return {"loss": total / cfg.train.grad_accum, "grad_norm": float(gnorm),
                "lr": self.scheduler.get_last_lr()[0]}

    # -- validation ------------------------------------------------------------------------------
    def validate(self) -> float | None:
        if not self.val_cases:
            return None
        from ..evaluation.protocol import ProtocolConfig, evaluate
        from ..methods.sdfsmis import SDFSMISPredictor

        predictor = SDFSMISPredictor(self.model, self.cfg, device=self.device)
        res = evaluate(self.dataset, predictor, ProtocolConfig(
            support_case=self.fold.support, query_cases=list(self.val_cases), surface_metrics=False),
            progress=False)
        return res["mean_dice"]

    def save(self, val_dice: float | None = None, best: bool = False):
        extra = {"best": self.best, "history": self.history, "val_dice": val_dice,
                 "fold": self.cfg.data.fold, "seed": self.cfg.train.seed}
        return ck.save_checkpoint(self.run_dir, self.step, self.model.trainable_state_dict(), self.optimizer,
                                  self.scheduler, self.ema.shadow if self.ema else None, extra, best=best,
                                  keep_last=self.cfg.train.keep_last)

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        writer = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc=f"train fold {cfg.data.fold}",
                   unit="step", disable=not (self.progress and self.is_main))
        t0 = time.time()
        while self.step < cfg.train.max_steps:
            stats = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}")
            if writer is not None and (self.step % cfg.train.log_every == 0 or self.step == 1):
                for k, v in stats.items():
                    writer.add_scalar(f"train/{k}", v, self.step)
            if writer is not None and cfg.train.image_every and self.step % cfg.train.image_every == 0:
                self._log_images(writer)
            val_due = cfg.train.val_every and self.step % cfg.train.val_every == 0
            ckpt_due = self.step % cfg.train.ckpt_every == 0 or self.step == cfg.train.max_steps
            val_dice, is_best = None, False
            if val_due or (ckpt_due and self.step == cfg.train.max_steps):
                val_dice = self.validate() if self.is_main else None
                if val_dice is not None:
                    is_best = val_dice > self.best
                    self.best = max(self.best, val_dice)
                    self.history.append({"step": self.step, "val_dice": val_dice})
                    if writer is not None:
                        writer.add_scalar("val/dice", val_dice, self.step)
            if self.is_main and (ckpt_due or is_best):
                self.save(val_dice, best=is_best)
            if self.dist:
                torch.distributed.barrier()
        bar.close()
        summary = {"steps": self.step, "seconds": round(time.time() - t0, 1), "best_val_dice": self.best,
                   "history": self.history, "index": ck.read_index(self.run_dir)}
        if self.latent_cache is not None:
            summary["latent_cache"] = self.latent_cache.stats()
        if self.is_main:
            atomic_write_json(self.run_dir / "train_summary.json", summary)
            writer.close()
        return summary

    @torch.no_grad()
    def _log_images(self, writer):
        from ..methods.sdfsmis import SDFSMISPredictor

        batch = self.micro_batch(self.step, 0)
        pred = SDFSMISPredictor(self.model, self.cfg, device=self.device).predict_batch(
            batch.support_images[:1], batch.support_masks[:1], batch.query_images[:1])
        panel = torch.cat([(batch.support_images[0, 0] + 1) / 2, batch.support_masks[0, 0],
                           (batch.query_images[0, 0] + 1) / 2, torch.as_tensor(pred[0]).float().to(self.device),
                           batch.query_masks[0, 0]], dim=1)
        writer.add_image("episode/support|mask|query|pred|gt", panel[None].cpu(), self.step)


class _LossModule(torch.nn.Module):
    """DDP needs a forward: this one is the model's loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, generator, posteriors=None):
        return self.model.loss(batch, generator, posteriors)


def train_folds(cfg: Config, out: Path, folds, device=None, progress=True) -> dict:
    """Train one model per fold into out/fold<k>/ (one command for all 5 folds)."""
    import copy

    results = {}
    for k in folds:
        c = copy.deepcopy(cfg)
        c.data.fold = int(k)
        run = out / f"fold{k}"
        tr = Trainer(c, run, device, progress).setup()
        tr.resume()
        results[k] = tr.fit()
    return results


__all__ = ["Trainer", "collate", "train_folds", "fold_split", "make_sampler", "EMA"]
