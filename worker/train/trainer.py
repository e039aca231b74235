"""The training loop over a sharded model: micro-batches, clipping, step, eval, logs, telemetry."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from worker.engine.progress import Activity
from worker.engine.zero3 import Zero3Engine
from worker.islands.outer import OuterSync
from worker.state.buddy import Buddy
from worker.state.catalog import latest_checkpoint, prune_checkpoints
from worker.state.checkpoint import Checkpointed, load_checkpoint, save_checkpoint
from worker.state.shards import ShardedState
from worker.train.config import TrainConfig
from worker.train.optim import build_optimizer, build_scheduler, engine_decay_ranges
from worker.train.state import StepStats, TrainState

log = logging.getLogger(__name__)

FP16_LOSS_SCALE = 1024.0  # static scale: a step whose global grad norm is not finite is skipped


def rank_micro_batch(data, config: TrainConfig, *, step: int, micro: int, rank: int,
                     world_size: int, device: torch.device,
                     rows: int | None = None) -> dict[str, torch.Tensor]:
    """This rank's rows of the global micro-batch ``micro`` of ``step``, on ``device``
    (``rows`` rows, default ``config.micro_batch_rows``)."""
    batch = data.rank_batch(step=step, micro_batch=micro, grad_accum=config.grad_accum,
                            micro_batch_rows=rows or config.micro_batch_rows, rank=rank,
                            world_size=world_size)
    return {k: v.to(device) for k, v in batch.items()}


def data_share(config: TrainConfig, *, rank: int, world_size: int) -> tuple[int, int, int]:
    """(rank, world size, rows per global micro-batch) this rank reads the data as. Islands on
    one shared corpus split every step's rows as data parallel over all their workers would
    (island i's rank r is rank i*W + r of I*W); private data is split over the island only."""
    islands = config.islands
    if not islands.enabled or islands.private_data:
        return rank, world_size, config.micro_batch_rows
    return (islands.index * world_size + rank, islands.count * world_size,
            islands.count * config.micro_batch_rows)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated device memory (CUDA) or peak resident set size of the process (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class Trainer:
    """Drives a Zero3Engine through ``config.steps`` optimizer steps on this rank's data.

    Its progress is a ``TrainState``; what a checkpoint or a buddy replica holds is
    ``self.states`` (shards, progress, schedule), handed to worker/state/ whole."""

    def __init__(self, config: TrainConfig, *, engine: Zero3Engine, data, rank: int,
                 world_size: int, on_step: Callable[[StepStats], None] | None = None,
                 outer: OuterSync | None = None):
        config.check_world_size(world_size)
        self.config = config
        self.engine = engine
        self.data = data
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(config.device)
        self.optimizer = build_optimizer(engine.parameters(), config.optim,
                                         engine_decay_ranges(engine))
        self.scheduler = build_scheduler(self.optimizer, config.optim, config.steps)
        self.on_step = on_step
        self.on_eval: Callable[[int, float], None] | None = None  # (step, held-out loss)
        self.outer = outer  # the outer (DiLoCo) loop between islands, if there are several
        self.data_rank, self.data_world, self.data_rows = data_share(config, rank=rank,
                                                                     world_size=world_size)
        self.state = TrainState(rows_per_step=config.grad_accum * config.micro_batch_rows,
                                num_train_rows=getattr(data, "num_train_rows", None),
                                data_fingerprint=getattr(data, "fingerprint", None),
                                device=self.device)
        self.states = Checkpointed(
            shards=ShardedState(engine, self.optimizer, store_frozen=config.lora is None,
                                source=config.model.name, outer=outer),
            progress=self.state, scheduler=self.scheduler, config=config.to_dict())
        self.loss_scale = FP16_LOSS_SCALE if config.mixed_precision == "fp16" else 1.0
        self.buddy = (Buddy(self.states, engine.collectives, timeout=engine.config.timeout)
                      if config.buddy and world_size > 1 else None)

    @property
    def step(self) -> int:
        """Optimizer steps done (the state's)."""
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def history(self) -> list[StepStats]:
        return self.state.history

    @property
    def eval_history(self) -> list[tuple[int, float]]:
        return self.state.eval_history

    def train_step(self) -> StepStats:
        """One optimizer step: grad_accum micro-batches, global clip, step on owned slices."""
        cfg, t0 = self.config, time.perf_counter()
        loss_sum = torch.zeros(1)
        tokens = 0
        for micro in range(cfg.grad_accum):
            batch = rank_micro_batch(self.data, cfg, step=self.step, micro=micro,
                                     rank=self.data_rank, world_size=self.data_world,
                                     device=self.device, rows=self.data_rows)
            out = self.engine.forward(**batch)
            loss = out.loss.float()
            last = micro == cfg.grad_accum - 1
            self.engine.backward(loss * (self.loss_scale / cfg.grad_accum),
                                 sync_grads=last or cfg.traffic.grad_sync == "micro-batch")
            loss_sum += loss.detach().cpu() / cfg.grad_accum
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        norm, summed = self.engine.clip_grad_norm(
            cfg.optim.max_grad_norm, extra=torch.cat([loss_sum, torch.tensor([tokens])]),
            loss_scale=self.loss_scale)
        skipped = not torch.isfinite(torch.tensor(norm)).item()
        if self.buddy:
            self.buddy.settle()  # the last step's replica must land before this update
        lr = self.scheduler.get_last_lr()[0]
        if skipped:
            log.warning("step %d: gradient norm %s is not finite; skipping the update", self.step, norm)
        else:
            self.engine.publish(Activity.OPTIMIZER)
            self.optimizer.step()
            self.scheduler.step()  # a skipped step does not advance the schedule (as HF does)
        self.optimizer.zero_grad(set_to_none=True)
        self.engine.end_step()
        seconds = time.perf_counter() - t0
        global_tokens = int(summed[1])
        done = StepStats(step=self.step, loss=float(summed[0]) / self.world_size, lr=lr,
                         grad_norm=norm, tokens=global_tokens, seconds=seconds,
                         tokens_per_s=global_tokens / seconds if seconds > 0 else 0.0,
                         peak_mem_mb=peak_memory_mb(self.device), skipped=skipped)
        self.step += 1
        self.history.append(done)
        return done

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the held-out rows, averaged over every rank's share; in eval mode,
        so a kept dropout (--keep-dropout) does not reach the loss."""
        total = torch.zeros(2)
        self.engine.model.eval()
        try:
            for batch in self.data.eval_batches(rows=self.config.micro_batch_rows,
                                                rank=self.rank, world_size=self.world_size,
                                                limit=self.config.eval_batches):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out = self.engine.forward(**batch)
                total += torch.tensor([float(out.loss), 1.0])
        finally:
            self.engine.model.train()
        total = self.engine.all_reduce_sum(total)
        value = float(total[0] / total[1]) if total[1] > 0 else float("nan")
        self.eval_history.append((self.step, value))
        return value

    def run(self, progress: bool = False) -> list[StepStats]:
        """Train until ``config.steps``; eval every ``eval_every`` steps and at the end."""
        bar = tqdm(total=self.config.steps, initial=self.step, disable=not progress,
                   desc=f"rank {self.rank}", dynamic_ncols=True)
        while self.step < self.config.steps:
            if self.outer is not None and self.outer.joining:
                self._outer_round()  # a (re)formed island: the global copy first, no steps
                continue
            done = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{done.loss:.4f}", lr=f"{done.lr:.2e}")
            if self.step % max(self.config.log_every, 1) == 0:
                log.log(logging.INFO if self.rank == 0 else logging.DEBUG,
                        "step %d loss %.4f lr %.3e grad_norm %.3f tokens/s %.0f seconds %.3f "
                        "peak_mem %.0f MB", done.step, done.loss, done.lr, done.grad_norm,
                        done.tokens_per_s, done.seconds, done.peak_mem_mb)
            if self.on_step:
                self.on_step(done)
            if self.outer is not None and self.outer.due(self.step):
                self._outer_round()
            last = self.step == self.config.steps
            if self.config.eval_every and (self.step % self.config.eval_every == 0 or last):
                value = self.evaluate()
                log.log(logging.INFO if self.rank == 0 else logging.DEBUG, "step %d eval loss %.4f",
                        self.step, value)
                if self.on_eval:
                    self.on_eval(self.step, value)
            if self.buddy:
                self.buddy.after_step()
            if self._checkpoint_due():
                self.save_checkpoint()
        if self.buddy:
            self.buddy.settle()
        bar.close()
        return self.history

    def _outer_round(self) -> None:
        """One outer round; the inner step count follows the round (a joiner skips ahead)."""
        since = self.outer.round * self.config.islands.outer_every
        tokens = sum(s.tokens for s in self.history if s.step >= since)
        self.outer.sync(weight=float(tokens) if self.config.islands.private_data else 1.0)
        target = self.outer.round * self.config.islands.outer_every
        while self.step < target:  # the schedule follows the steps skipped
            self.step += 1
            self.scheduler.step()

    def _checkpoint_due(self) -> bool:
        cfg = self.config
        if not cfg.checkpoint_dir:
            return False
        every = cfg.checkpoint_every
        return self.step == cfg.steps or (every > 0 and self.step % every == 0)

    def save_checkpoint(self) -> Path:
        """Every rank writes its slices; rank 0 publishes the step and prunes old ones."""
        cfg = self.config
        path = save_checkpoint(cfg.checkpoint_root, self.states, rank=self.rank,
                               world_size=self.world_size, collectives=self.engine.collectives,
                               observers=self.engine.observers)
        if self.rank == 0:
            prune_checkpoints(cfg.checkpoint_root, keep_last=cfg.keep_last)
        return path

    def resume(self) -> bool:
        """Load the newest complete checkpoint in ``checkpoint_dir`` (any world size), if any."""
        cfg = self.config
        if not (cfg.checkpoint_dir and cfg.resume):
            return False
        path = latest_checkpoint(cfg.checkpoint_root)
        if path is None:
            return False
        load_checkpoint(path, self.states, rank=self.rank, world_size=self.world_size)
        return True
