"""The training loop: DistributedModelParallel + TrainPipelineSparseDist, evaluation, checkpoints.

Training runs in segments that end at an evaluation or checkpoint boundary; each segment drains
the pipeline, so a checkpoint never has batches in flight and resuming after step s replays
exactly the batches from s on (the batch order depends only on seed, epoch and rank).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Protocol

import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from sharded_mde.config import TrainConfig
from sharded_mde.data.batches import iterate_batches, iterate_eval_batches, num_batches, num_eval_batches
from sharded_mde.train.checkpoint import MODEL, OPTIMIZER, latest_checkpoint, load_checkpoint, save_checkpoint
from sharded_mde.train.distributed import DistEnv
from sharded_mde.train.metrics import classification_metrics
from sharded_mde.train.sharding import make_optimizer

WARMUP_STEPS = 10  # steps of each fit() left out of the steady-state throughput


class Callback(Protocol):
    """Hooks a search uses to steer training (e.g. the budget controller) and to checkpoint itself."""

    def on_step_end(self, trainer: "Trainer", step: int) -> None: ...

    def on_eval(self, trainer: "Trainer", step: int, metrics: Dict[str, float]) -> None: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    """What a finished training run reports."""

    steps: int
    examples_per_s: float
    train_seconds: float
    valid: Dict[str, float] = field(default_factory=dict)
    history: List[Dict[str, float]] = field(default_factory=list)
    steady_examples_per_s: float = 0.0


class Trainer:
    """Trains a DMP-wrapped model on a prepared data directory, resuming from its checkpoints."""

    def __init__(
        self,
        dmp: DistributedModelParallel,
        cfg: TrainConfig,
        env: DistEnv,
        data_dir: str | Path,
        checkpoint_dir: Optional[str | Path] = None,
        callbacks: Optional[List[Callback]] = None,
        valid_split: str = "valid",
    ) -> None:
        self.dmp = dmp
        self.cfg = cfg
        self.env = env
        self.data_dir = Path(data_dir)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.callbacks = list(callbacks or [])
        self.valid_split = valid_split
        self.optimizer = make_optimizer(dmp, cfg)
        self.pipeline = TrainPipelineSparseDist(dmp, self.optimizer, env.device)
        self.step = 0
        self.history: List[Dict[str, float]] = []
        self.batches_per_epoch = num_batches(self.data_dir, "train", cfg.batch_size, env.world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.data_dir}: the train split has fewer rows than one global batch "
                             f"({cfg.batch_size} x {env.world_size} ranks)")
        self.total_steps = max(1, int(math.ceil(cfg.epochs * self.batches_per_epoch)))

    # ------------------------------------------------------------------ state
    def local_state(self) -> Dict[str, Any]:
        """This rank's trainer state beside the model and optimizer: step, eval history, callbacks, RNG."""
        return {
            "step": self.step,
            "history": self.history,
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "rng": torch.get_rng_state(),
        }

    def save(self) -> None:
        if self.checkpoint_dir is None:
            return
        save_checkpoint(self.checkpoint_dir, self.step,
                        {MODEL: self.dmp.state_dict(), OPTIMIZER: self.optimizer.state_dict()},
                        {"total_steps": self.total_steps}, local=self.local_state())

    def try_resume(self) -> bool:
        """Loads the newest finished checkpoint, if any (made on any world size and plan); returns whether it did."""
        if self.checkpoint_dir is None:
            return False
        d = latest_checkpoint(self.checkpoint_dir)
        if d is None:
            return False
        self.optimizer.init_state()  # a fresh Adam has no state yet and KeyedOptimizer will not load into that
        self.optimizer.zero_grad(set_to_none=True)
        model, optimizer = self.dmp.state_dict(), self.optimizer.state_dict()
        local = load_checkpoint(d, model, optimizer)
        if local is None:
            raise ValueError(f"{d}: checkpoint holds no trainer state (not written by the trainer)")
        self.dmp.load_state_dict(model)
        self.optimizer.load_state_dict(optimizer)
        self.step = int(local["step"])
        self.history = list(local["history"])
        for cb, st in zip(self.callbacks, local["callbacks"]):
            cb.load_state_dict(st)
        torch.set_rng_state(local["rng"])
        return True

    # ------------------------------------------------------------------ loops
    def _train_batches(self, start: int, stop: int) -> Iterator[Any]:
        """Batches for global steps [start, stop), crossing epoch boundaries."""
        step = start
        while step < stop:
            epoch, offset = divmod(step, self.batches_per_epoch)
            n = min(stop - step, self.batches_per_epoch - offset)
            it = iterate_batches(self.data_dir, "train", self.cfg.batch_size, rank=self.env.rank,
                                 world_size=self.env.world_size, seed=self.cfg.seed, epoch=epoch, start_batch=offset)
            for batch in itertools.islice(it, n):
                yield batch.to(self.env.device)
            step += n

    def _boundaries(self) -> List[int]:
        every = [self.cfg.eval_every, self.cfg.checkpoint_every]
        points = {self.total_steps}
        points.update(e * self.batches_per_epoch for e in range(1, int(self.cfg.epochs) + 1))
        for n in every:
            if n > 0:
                points.update(range(n, self.total_steps, n))
        return sorted(p for p in points if 0 < p <= self.total_steps)

    def fit(self) -> TrainResult:
        """Trains from the current step to `epochs`, evaluating and checkpointing at segment boundaries.

        Call `try_resume()` first to continue an interrupted run.
        """
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not (self.cfg.progress and self.env.is_main), dynamic_ncols=True)
        examples, seconds = 0, 0.0
        steady_examples, steady_seconds, done = 0, 0.0, 0
        for boundary in self._boundaries():
            if boundary <= self.step:
                continue
            self.dmp.train()
            it = self._train_batches(self.step, boundary)
            t0 = t_prev = time.perf_counter()
            while True:
                try:
                    loss, logits, _ = self.pipeline.progress(it)
                except StopIteration:
                    break
                now = time.perf_counter()
                self.step += 1
                done += 1
                examples += logits.numel() * self.env.world_size
                if done > WARMUP_STEPS:  # steady state: no first-step allocation or kernel set-up
                    steady_examples += logits.numel() * self.env.world_size
                    steady_seconds += now - t_prev
                t_prev = now
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step)
                if self.step % 10 == 0 or self.step == boundary:
                    elapsed = seconds + time.perf_counter() - t0
                    bar.set_postfix(loss=f"{float(loss):.4f}", ex_s=f"{examples / max(elapsed, 1e-9):,.0f}")
                bar.update(1)
            seconds += time.perf_counter() - t0
            if self._is_eval_point(boundary):
                metrics = self.evaluate(self.valid_split, max_batches=self.cfg.eval_batches)
                metrics["step"] = self.step
                self.history.append(metrics)
                for cb in self.callbacks:
                    cb.on_eval(self, self.step, metrics)
                if self.env.is_main and self.cfg.progress:
                    bar.write(f"step {self.step}: {self.valid_split} auc {metrics['auc']:.4f} logloss {metrics['logloss']:.4f}")
            self.save()
        bar.close()
        valid = self.history[-1] if self.history else {}
        steady = steady_examples / steady_seconds if steady_seconds > 0 else examples / max(seconds, 1e-9)
        return TrainResult(self.step, examples / max(seconds, 1e-9), seconds, valid, self.history, steady)

    def _is_eval_point(self, step: int) -> bool:
        e = self.cfg.eval_every
        return step == self.total_steps or step % self.batches_per_epoch == 0 or (e > 0 and step % e == 0)

    @torch.no_grad()
    def predict(self, split: str, max_batches: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels) of every row of `split`, gathered from all ranks."""
        model = self.pipeline.detach()
        was_training = model.training
        model.eval()
        # Copied into one buffer each: keeping every batch's output tensors alive pinned the memory
        # around them, and resident memory grew by megabytes per evaluation batch.
        size = num_eval_batches(self.data_dir, split, self.cfg.batch_size, self.env.world_size, max_batches)
        logits, labels, n = torch.empty(size * self.cfg.batch_size), torch.empty(size * self.cfg.batch_size), 0
        for batch, n_valid in iterate_eval_batches(self.data_dir, split, self.cfg.batch_size, self.env.rank,
                                                   self.env.world_size, max_batches=max_batches):
            _, (_, out, lab) = model(batch.to(self.env.device))
            logits[n:n + n_valid] = out[:n_valid].cpu()
            labels[n:n + n_valid] = lab[:n_valid].cpu()
            n += n_valid
        model.train(was_training)
        local = (logits[:n].clone(), labels[:n].clone())
        if self.env.world_size == 1:
            return local
        gathered: List[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, local)
        return torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])

    def evaluate(self, split: str, max_batches: int = 0) -> Dict[str, float]:
        """AUC and log loss on `split` (all ranks' rows)."""
        return classification_metrics(*self.predict(split, max_batches))
