"""The two-stage VQ-VAE trainer (TRELLIS trainer semantics).

Stage 1 freezes encoder and decoder (before any DDP wrap) and trains the codebook; stage 2 trains everything
from the WHOLE stage-1 model. One step = one batch of ``batch_size_per_gpu`` samples per rank, split by
samples into micro-batches whose gradients accumulate. Each micro-batch's loss is weighted by its share of
the batch's latent voxels: the losses are means over latent voxels (VQ terms) and over their 512 decoded
children each (reconstruction, without chunking), so the accumulated gradient equals the full batch's
under ``recon_weighting: uniform``; ``balanced`` takes its group shares per micro-batch (close, not equal).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ctvq.config import CTVQConfig, config_warnings, resolve_path
from ctvq.data.collate import collate_sparse
from ctvq.models import SparseSDFVQVAE
from ctvq.train import checkpoint as ckpt
from ctvq.train import distributed as dist_util
from ctvq.train import guard
from ctvq.train.clip import build_clipper
from ctvq.train.ema import ParameterEMA
from ctvq.train.loader import EpochSampler, build_dataset, build_loader
from ctvq.train.optim import build_optimizer, build_scheduler, current_lr
from ctvq.train.precision import Precision
from ctvq.train.progress import LossEnds, RateMeter, RunLog, format_duration
from ctvq.train.rundir import (
    check_same_data,
    check_same_run,
    data_fingerprint,
    find_resume_point,
    write_data_fingerprint,
    write_run_files,
)
from ctvq.train.snapshot import write_snapshot
from ctvq.train.stop import STOP_SIGNALS, StopRequests, TrainingInterrupted

LOSS_KEYS = ("loss", "recon_loss", "codebook_loss", "commitment_loss", "usage", "perplexity")


@dataclass(frozen=True)
class RunOptions:
    output_dir: Path
    data: Path
    resume: str = "auto"  # auto | never | path of a checkpoint file
    tensorboard: bool = True
    argv: tuple[str, ...] | None = None
    allow_data_change: bool = False  # resume although the training cases differ from the run's data.json


@dataclass(frozen=True)
class TrainSummary:
    start_step: int
    end_step: int
    seconds: float
    start_loss: float  # mean over the first ``loss_span`` steps of this process (LossEnds)
    end_loss: float  # mean over its last ``loss_span`` steps
    loss_span: int
    skipped_steps: int
    final_checkpoint: Path | None


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "numpy_gauss": (int(np_state["has_gauss"]), float(np_state["gauss"])),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    np.random.set_state({"bit_generator": "MT19937", "state": {
        "key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
        "has_gauss": state["numpy_gauss"][0], "gauss": state["numpy_gauss"][1]})
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


class Trainer:
    """Built from a validated config; ``run()`` trains to the end and writes ``ckpts/final.pt``."""

    def __init__(self, cfg: CTVQConfig, options: RunOptions, info: dist_util.DistInfo | None = None) -> None:
        self.cfg = cfg
        self.t = t = cfg.trainer
        self.options = options
        self.info = info or dist_util.DistInfo(0, 1, 0, torch.device("cpu"))
        self.device = self.info.device
        self.out = Path(options.output_dir)
        self.ckpt_dir = self.out / "ckpts"
        self.resolved = cfg.to_dict()
        # Everything that can be wrong with the inputs is checked before any work.
        pretrained = resolve_path(cfg.origin, t.pretrained_vae_path, must_exist=True)
        resume = find_resume_point(self.out, options.resume, t.ema_rate)
        if resume is not None or options.resume == "auto":
            check_same_run(self.out, self.resolved)
        self.dataset = build_dataset(cfg.dataset, Path(options.data))
        self.data_fingerprint = data_fingerprint(Path(options.data), self.dataset.records)
        self.data_change = (check_same_data(self.out, self.data_fingerprint, options.allow_data_change)
                            if resume is not None else None)

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = SparseSDFVQVAE(**cfg.model.to_dict()["args"])
        self.init_report = ckpt.load_stage_input(model, pretrained, t.training_stage) if pretrained else None
        model.freeze_for_stage(t.training_stage, t.stage1_mode)
        self.autoencoder = t.training_stage == 1 and t.stage1_mode == "autoencoder"
        if t.fp16_mode == "inflat_all" and not model.use_fp16:
            model.convert_to_fp16()
        self.model = model.to(self.device)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.trainable_names = [n for n, _ in named]
        # The collapse guard watches runs whose decoder learns (a frozen one cannot collapse, nor recover).
        self.guarded = any(n.startswith("decoder.") for n in self.trainable_names)
        self.precision = Precision(t.fp16_mode, [p for _, p in named], self.device, t.fp16_scale_growth)
        self.optimizer = build_optimizer(t.optimizer, self.precision.optimizer_params()) if named else None
        self.scheduler = build_scheduler(t.lr_scheduler, self.optimizer) if self.optimizer else None
        self.clipper = build_clipper(t.grad_clip)
        # Rank 0 keeps the EMAs (TRELLIS); with nothing trainable an EMA file is the model itself.
        self.ema = ParameterEMA(model, t.ema_rate) if self.info.is_main else None

        self.sampler = EpochSampler(len(self.dataset), rank=self.info.rank, world_size=self.info.world_size,
                                    seed=t.seed)
        self.loader = build_loader(self.dataset, self.sampler, batch_size=t.batch_size_per_gpu,
                                   batch_split=t.batch_split, num_workers=t.num_workers,
                                   pin_memory=self.device.type == "cuda")
        self.steps_per_epoch = math.ceil(self.sampler.per_rank / t.batch_size_per_gpu)
        epochs_cap = t.max_epoch * self.steps_per_epoch if t.max_epoch is not None else t.max_steps
        self.total_steps = min(t.max_steps, epochs_cap)
        self.step = self.epoch = self.batch_in_epoch = self.skipped = 0
        self.grad_state = guard.GradState()
        torch.manual_seed(t.seed * 7919 + 1 + self.info.rank)  # per-rank stream for the run's random choices
        if resume is not None:
            self._load(resume)
            if self.batch_in_epoch >= self.steps_per_epoch:  # fewer cases now (--allow-data-change)
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.net: torch.nn.Module = model
        if self.info.distributed and named:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        if self.info.is_main:
            write_run_files(self.out, self.resolved, list(options.argv) if options.argv is not None else None)
            write_data_fingerprint(self.out, self.data_fingerprint)
        dist_util.barrier()
        self.log = RunLog(self.out, enabled=self.info.is_main, start_step=self.step,
                          tensorboard=options.tensorboard)
        self.resumed_from = resume

    # -- checkpoints ---------------------------------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's state with trainable tensors at full precision (fp32 masters under inflat_all)."""
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        for name, value in zip(self.trainable_names, self.precision.fp32_values(), strict=True):
            state[name] = value.detach().cpu().clone()
        return state

    def save(self) -> None:
        rng = dist_util.all_gather_objects(_rng_state(self.device))
        if self.info.is_main:
            stage, step, config = self.t.training_stage, self.step, self.model.config
            emas = {} if self.ema is None else {
                r: ckpt.model_payload(self.ema.model_state(self.model, r), config, stage, step, "ema", r)
                for r in self.t.ema_rate
            }
            misc = {
                "step": step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "skipped": self.skipped, "world_size": self.info.world_size, "rng": rng,
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "precision": self.precision.state_dict(),
                "clipper": self.clipper.state_dict() if self.clipper else None,
                "guard": guard.grad_state_dict(self.grad_state),
            }
            ckpt.save_set(self.ckpt_dir, step, ckpt.model_payload(self.model_state(), config, stage, step),
                          emas, misc)
        dist_util.barrier()

    def _load(self, point: Any) -> None:
        step = point.step
        misc_file = ckpt.misc_path(point.ckpt_dir, step)
        misc = ckpt.load_file(misc_file)
        if misc["world_size"] != self.info.world_size:
            raise ckpt.CheckpointError(
                f"{misc_file}: saved by {misc['world_size']} processes, this run has {self.info.world_size}; "
                "resume with the same number of processes (data order and RNG streams are per rank)"
            )
        state = ckpt.load_file(ckpt.model_path(point.ckpt_dir, step))["vae"]
        self.model.load_state_dict(state, strict=True)
        # The file holds the trainable tensors at full precision: the fp32 masters under inflat_all.
        self.precision.load_master_values([state[n] for n in self.trainable_names])
        if self.ema is not None:
            for rate in self.t.ema_rate:
                path = ckpt.ema_path(point.ckpt_dir, step, rate)
                self.ema.load_model_state(rate, ckpt.load_file(path)["vae"], str(path))
        if self.optimizer is not None:
            self.optimizer.load_state_dict(misc["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(misc["scheduler"])
        self.precision.load_state_dict(misc["precision"], str(misc_file))
        if self.clipper is not None:
            self.clipper.load_state_dict(misc["clipper"])
        self.step, self.epoch, self.batch_in_epoch = step, misc["epoch"], misc["batch_in_epoch"]
        self.skipped = misc["skipped"]
        self.grad_state = guard.grad_state_from_dict(misc.get("guard"))
        _set_rng_state(misc["rng"][self.info.rank], self.device)
        if self.info.is_main:
            ckpt.remove_stale_temp(point.ckpt_dir)

    @torch.no_grad()
    def fit_codebook(self) -> None:
        """After the autoencoder warm-up: k-means codebook on the encoder outputs of every training case
        (one pass, each case cropped as in training), so stage 2 starts with codes where the latents are."""
        self.model.eval()
        latents = []
        for index in range(len(self.dataset)):
            batch = _to_device(collate_sparse([self.dataset[index]]), self.device)
            latents.append(self.model.continuous_latent(batch).feats.cpu())
        z = torch.cat(latents)
        self.model.quantizer.fit(z.to(self.device))
        self.log.text(f"codebook fitted by k-means on {z.shape[0]} encoder outputs of {len(self.dataset)} "
                      f"cases ({self.model.quantizer.num_embeddings} codes)")

    def write_final(self) -> Path:
        path = ckpt.final_path(self.out)
        if self.info.is_main:
            payload = ckpt.model_payload(self.model_state(), self.model.config, self.t.training_stage,
                                         self.step, "final")
            ckpt.atomic_torch_save(payload, path)
        dist_util.barrier()
        return path

    # -- one step ------------------------------------------------------------------------------------------
    def uniform_mix(self) -> float:
        """Share of the plain mean in the reconstruction weights: 0 -> 1 over recon_weighting_anneal_steps."""
        steps = self.t.recon_weighting_anneal_steps
        return min(1.0, self.step / steps) if steps else 0.0

    def train_step(self, micro_batches: list[dict[str, Any]], keep_output: bool = False
                   ) -> tuple[dict[str, float], tuple[dict[str, Any], dict[str, Any]] | None]:
        """Forward/backward every micro-batch, then one optimizer step -> (logs, batch 0's output)."""
        t = self.t
        self.model.train()
        self.precision.zero_grad()
        latent = [int(mb["latent_coords"].shape[0]) for mb in micro_batches]
        total = float(sum(latent))
        logs = dict.fromkeys(LOSS_KEYS, 0.0)
        kept = None
        trains = self.optimizer is not None
        last = len(micro_batches) - 1
        for i, mb in enumerate(micro_batches):
            mb = _to_device(mb, self.device)
            weight = latent[i] / total
            sync = self.net.no_sync() if isinstance(self.net, DistributedDataParallel) and i < last \
                else contextlib.nullcontext()
            grad = contextlib.nullcontext() if trains else torch.no_grad()
            with sync, grad:
                with self.precision.autocast():
                    out = self.net(mb, loss_type=t.loss_type, recon_weighting=t.recon_weighting,
                                   uniform_mix=self.uniform_mix(), bypass_quantizer=self.autoencoder)
                loss = (out["recon_loss"].float() + t.lambda_vq * out["codebook_loss"].float()
                        + t.lambda_commitment * out["commitment_loss"].float())
                if trains:
                    self.precision.backward(loss * weight)
            for key, value in (("loss", loss), *((k, out[k]) for k in LOSS_KEYS[1:])):
                logs[key] += weight * float(value.detach())
            if keep_output and i == 0:
                kept = (mb, out)
            del out, loss
        logs["grad_norm"] = math.nan
        logs["applied"] = 1.0
        if trains:
            result = self.precision.step(self.optimizer, self.clipper)
            logs["grad_norm"], logs["applied"] = result.grad_norm, float(result.applied)
            if result.applied and self.ema is not None:
                self.ema.update(self.precision.fp32_values())
            if self.scheduler is not None:
                with warnings.catch_warnings():
                    # The schedule follows the step counter, also over skipped (overflow) steps; torch warns
                    # when that happens before the first optimizer step.
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
                    self.scheduler.step()
        logs["lr"] = current_lr(self.optimizer) if self.optimizer else 0.0
        logs["loss_scale"] = self.precision.loss_scale
        return logs, kept

    # -- the collapse guard (ctvq.train.guard) ------------------------------------------------------------
    def _sample_and_guard(self, step: int, grad_norm: float,
                          kept: tuple[dict[str, Any], dict[str, Any]] | None) -> dict[str, float]:
        """Rank 0: feed the gradient guard; at ``i_sample`` steps (``kept``) write the snapshot and check the
        batch's reconstruction has a surface. Warnings go to the log; the check's scalars are returned for
        this step's metrics row, or logged in a row of their own when the step logs no means."""
        if kept is not None and not self.t.disable_snapshot:
            write_snapshot(self.out / "samples" / f"step{step:07d}.png", kept[0], kept[1], step)
        if not (self.info.is_main and self.guarded):
            return {}
        self.grad_state = guard.update_grad_state(self.grad_state, grad_norm)
        if self.grad_state.fired:
            self.log.warning(step, guard.grad_message(step, grad_norm, self.grad_state))
        if kept is None:
            return {}
        recon = kept[1]["recon"]
        check = guard.surface_check(recon.coords, recon.feats[:, 0], kept[1]["target"])
        if guard.surface_warning_due(step, check):
            self.log.warning(step, guard.surface_message(step, check))
        if step % self.t.i_log and step != self.total_steps:
            self.log.scalars(step, check.scalars())
            return {}
        return check.scalars()

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self) -> TrainSummary:
        t, log = self.t, self.log
        start = self.step
        where = "fresh start"
        if self.resumed_from is not None:
            where = f"resumed from step {start} ({self.resumed_from.ckpt_dir})"
        log.text(f"ctvq train: stage {t.training_stage}, {len(self.dataset)} cases, {self.total_steps} steps "
                 f"({self.steps_per_epoch} per epoch), {self.info.world_size} process(es) on {self.device}, "
                 f"{where}")
        if self.data_change is not None:
            log.text(f"warning: --allow-data-change: {self.data_change}")
        if self.init_report is not None:
            log.text(f"initialised from {self.init_report.path} (codebook loaded: "
                     f"{self.init_report.codebook_loaded})")
        if self.optimizer is None:
            log.text("no trainable parameters (stage 1 with codebook_update=ema): the codebook learns by EMA")
        for warning in config_warnings(self.cfg):
            log.text(f"warning: {warning}")
        if self.autoencoder:
            log.text("stage1_mode autoencoder: encoder and decoder train with the quantizer bypassed; the "
                     "codebook is fitted by k-means on the encoder outputs at the end")
        meter = RateMeter(start, self.total_steps)
        ends = LossEnds(self.total_steps - start)
        t0 = time.perf_counter()
        with StopRequests() as stop:
            self._loop(meter, ends, stop)
        if self.autoencoder:
            self.fit_codebook()
        final = self.write_final()
        seconds = time.perf_counter() - t0
        log.text(f"done: steps {start}->{self.step} in {format_duration(seconds)}, {ends.describe()}, "
                 f"skipped steps {self.skipped}, final checkpoint {final}")
        log.close()
        return TrainSummary(start, self.step, seconds, ends.start, ends.end, ends.span, self.skipped, final)

    def _loop(self, meter: RateMeter, ends: LossEnds, stop: StopRequests) -> None:
        """Train to ``total_steps``; on a stop request save the step reached, raise TrainingInterrupted."""
        t, log = self.t, self.log
        pending: dict[str, list[float]] = {}  # this i_log interval's values, averaged when logged
        data_time = step_time = 0.0
        iterator = None
        while self.step < self.total_steps:
            tic = time.perf_counter()
            if iterator is None:
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch * t.batch_size_per_gpu)
                self.dataset.set_epoch(self.epoch)
                iterator = iter(self.loader)
            micro = next(iterator)
            toc = time.perf_counter()
            step = self.step + 1
            sample_step = (self.info.is_main and step % t.i_sample == 0
                           and (self.guarded or not t.disable_snapshot))
            logs, kept = self.train_step(micro, keep_output=sample_step)
            self.step = step
            self.batch_in_epoch += 1
            if self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch, self.batch_in_epoch, iterator = self.epoch + 1, 0, None
            self.skipped += int(not logs["applied"])
            data_time += toc - tic
            step_time += time.perf_counter() - tic
            for key, value in logs.items():
                pending.setdefault(key, []).append(value)
            ends.add(logs["loss"])
            guard_scalars = self._sample_and_guard(step, logs["grad_norm"], kept)
            if step % t.i_log == 0 or step == self.total_steps:
                means = {k: _finite_mean(v) for k, v in pending.items()}
                means = dist_util.all_mean(means, self.device)
                means["skipped_steps"] = float(self.skipped)
                means["steps_per_s"] = meter.rate(step)
                means["data_time_share"] = data_time / step_time if step_time > 0 else math.nan
                log.scalars(step, {**means, **guard_scalars})
                pending = {}
            if step % t.i_print == 0 or step == self.total_steps:
                log.text(f"step {step}/{self.total_steps}  loss {logs['loss']:.5f}  "
                         f"recon {logs['recon_loss']:.5f}"
                         f"  usage {logs['usage']:.3f}  lr {logs['lr']:.2e}  {meter.rate(step):.2f} steps/s  "
                         f"ETA {format_duration(meter.eta(step))}")
            if step % t.i_ddpcheck == 0 and self.info.distributed:
                dist_util.check_replicas(self.model, step)
            saved = step % t.i_save == 0 or step == self.total_steps
            if saved:
                self.save()
            # at the last step the run just finishes (its final checkpoint is moments away)
            if step < self.total_steps and dist_util.any_rank(stop.signum is not None, self.device):
                signum = stop.signum if stop.signum is not None else STOP_SIGNALS[0]
                if not saved:
                    self.save()
                log.text(f"stop requested ({signal.Signals(signum).name}) at step {step}: checkpoint saved; "
                         "the same command resumes from it")
                log.close()
                raise TrainingInterrupted(signum, step)


__all__ = ["LOSS_KEYS", "RunOptions", "TrainSummary", "Trainer"]
