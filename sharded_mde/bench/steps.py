"""Training step time of several models on the same batches, stepped in turn (rotating the order).

Used by `sharded-mde bench speed` for the search overhead (plain vs HAM-masked supernet, the mask
step included) and the compact model's speed-up (full vs compact). Stepping the variants one
step each in turn, with the order rotating, makes drift and other load on the machine hit every
variant alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torchrec import EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel

from sharded_mde.config import RunConfig
from sharded_mde.modules.masked_ebc import find_gate
from sharded_mde.train.distributed import DistEnv
from sharded_mde.train.sharding import make_optimizer, wrap_model

WARMUP_STEPS = 3
StepFn = Callable[[Batch], None]


def training_step(cfg: RunConfig, env: DistEnv, model: nn.Module, tables: List[EmbeddingBagConfig],
                  masked: bool = False) -> Tuple[DistributedModelParallel, StepFn]:
    """`model` sharded as training shards it, and its optimizer step; with `masked`, plus the HAM mask step."""
    from sharded_mde.train.run import sharding_plan

    torch.manual_seed(cfg.train.seed + 1)  # tables materialised by DMP from the meta device: seeded
    dmp = wrap_model(model, sharding_plan(model, tables, cfg, env), cfg.train, env.device)
    opt = make_optimizer(dmp, cfg.train)
    gate = find_gate(dmp) if masked else None

    def step(b: Batch) -> None:
        loss, _ = dmp(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if gate is not None:  # the search's per-step mask work: gradient all-reduce and the HAM step
            gate.update(gate.reduce_grad(), lam=1.0, lr=cfg.search.mask_lr, batch_size=b.labels.numel() * env.world_size)

    return dmp, step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_step_times(steps: Dict[str, StepFn], batches: Dict[str, Sequence[Batch]], rounds: int,
                           device: torch.device) -> Dict[str, List[float]]:
    """Seconds of every step of every variant: `rounds` passes over its batches, one step each in turn."""
    names = list(steps)
    for name in names:  # warm-up
        for b in batches[name][:WARMUP_STEPS]:
            steps[name](b)
    n = min(len(batches[name]) for name in names)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for i in range(n):
            k = (r * n + i) % len(names)
            for name in names[k:] + names[:k]:
                _sync(device)
                t0 = time.perf_counter()
                steps[name](batches[name][i])
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    return times


def ratio_summary(times: Dict[str, List[float]], name: str, reference: str) -> Dict[str, float]:
    """Median step ms of `name` and `reference`, their ratio, the ratio of the mean step times (the
    total time: it counts work done every k-th step, like the lazy regularity, that the median skips),
    and the median of the step-by-step ratios."""
    med, ref = statistics.median(times[name]), statistics.median(times[reference])
    return {f"{name}_median_step_ms": 1000 * med, f"{reference}_median_step_ms": 1000 * ref, "ratio": med / ref,
            "mean_ratio": statistics.fmean(times[name]) / statistics.fmean(times[reference]),
            "stepwise_ratio_median": statistics.median(a / b for a, b in zip(times[name], times[reference])),
            "steps": len(times[name])}
