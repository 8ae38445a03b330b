"""Search overhead: a training step of the HAM supernet vs the same model without masks, side by side.

The models (26 Criteo-shaped tables, rows log-spaced 100..200k, the run's head) are wrapped in
DistributedModelParallel on one process and stepped on the same batches, one step each in turn
(rotating the order), so that drift and other load on the machine hit every variant alike.
Prints and saves per-variant median step times, the ratios to the plain model, and the machine.

    OMP_NUM_THREADS=2 .venv/bin/python tools/bench_search_overhead.py --out runs/bench/search_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Dict, List

import numpy as np
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from sharded_mde.config import ModelConfig, RunConfig, SearchConfig, TrainConfig
from sharded_mde.io import atomic_write_json
from sharded_mde.modules.masked_ebc import find_gate
from sharded_mde.modules.model import build_model
from sharded_mde.plan.sharding import manual_plan
from sharded_mde.search.ham import build_supernet
from sharded_mde.train.distributed import init_distributed, shutdown_distributed
from sharded_mde.train.sharding import ebc_path, make_optimizer, wrap_model


def _tables(n: int, dim: int, rows_max: int) -> List[EmbeddingBagConfig]:
    rows = np.round(np.geomspace(100, rows_max, n)).astype(int)
    return [EmbeddingBagConfig(name=f"t_C{i + 1}", num_embeddings=int(r), embedding_dim=dim, feature_names=[f"C{i + 1}"])
            for i, r in enumerate(rows)]


def _batches(tables: List[EmbeddingBagConfig], batch: int, n_dense: int, count: int, device: torch.device) -> List[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        lengths = (torch.rand(len(tables) * batch, generator=g) > 0.1).to(torch.int32)  # one id, 10% missing
        values = torch.cat([torch.randint(0, t.num_embeddings, (int(lengths[i * batch:(i + 1) * batch].sum()),), generator=g)
                            for i, t in enumerate(tables)])
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[t.feature_names[0] for t in tables], values=values, lengths=lengths)
        out.append(Batch(dense_features=torch.randn(batch, n_dense, generator=g), sparse_features=kjt,
                         labels=torch.randint(0, 2, (batch,), generator=g).float()).to(device))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows-max", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--head", default="dlrm")
    p.add_argument("--out", default="runs/bench/search_overhead.json")
    args = p.parse_args()

    env = init_distributed()
    tables = _tables(args.tables, args.dim, args.rows_max)
    features, n_dense = [t.feature_names[0] for t in tables], 13
    tcfg = TrainConfig(batch_size=args.batch)
    search = SearchConfig()
    variants = {
        "plain": None,
        "masked": search,
        "masked_no_ortho": SearchConfig(ortho_weight=0.0),
    }
    models, opts = {}, {}
    for name, s in variants.items():
        torch.manual_seed(0)
        cfg = RunConfig(model=ModelConfig(head=args.head), train=tcfg, search=s or search)
        model = (build_model(cfg.model, tables, features, n_dense) if s is None
                 else build_supernet(cfg, tables, features, n_dense))
        plan = manual_plan(tables, "table_wise", env.world_size, device_type=env.device.type, module_fqn=ebc_path(model))
        models[name] = wrap_model(model, plan, tcfg, env.device)
        opts[name] = make_optimizer(models[name], tcfg)
    batches = _batches(tables, args.batch, n_dense, args.steps, env.device)

    gates = {n: find_gate(m) for n, m in models.items() if variants[n] is not None}

    def step(name: str, b: Batch) -> None:
        loss, _ = models[name](b)
        opts[name].zero_grad()
        loss.backward()
        opts[name].step()
        if name in gates:  # the search's per-step mask work: gradient all-reduce and the HAM step
            gates[name].update(gates[name].reduce_grad(), lam=1.0, lr=search.mask_lr, batch_size=args.batch)

    def sync() -> None:
        if env.device.type == "cuda":
            torch.cuda.synchronize()

    for name in variants:  # warm-up
        for b in batches[:3]:
            step(name, b)
    names = list(variants)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(args.rounds):  # step by step, rotating the order: bursts of other load hit every variant alike
        for i, b in enumerate(batches):
            k = (r * len(batches) + i) % len(names)
            for name in names[k:] + names[:k]:
                sync()
                t0 = time.perf_counter()
                step(name, b)
                sync()
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    result = {
        "median_step_ms": {n: round(1000 * m, 3) for n, m in med.items()},
        "ratio_to_plain": {n: round(med[n] / med["plain"], 4) for n in names if n != "plain"},
        # the same ratio step by step (each step of a variant against the plain step next to it)
        "median_stepwise_ratio": {n: round(statistics.median(a / p for a, p in zip(times[n], times["plain"])), 4)
                                  for n in names if n != "plain"},
        "steps_per_variant": len(times["plain"]),
        "config": {"batch": args.batch, "tables": args.tables, "dim": args.dim, "rows_max": args.rows_max,
                   "head": args.head, "ortho_rows": search.ortho_rows, "ortho_weight": search.ortho_weight,
                   "surrogate": search.surrogate, "world_size": env.world_size},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(env.device),
                    "gpu": torch.cuda.get_device_name() if env.device.type == "cuda" else None},
    }
    if env.is_main:
        print(json.dumps(result, indent=2))
        atomic_write_json(args.out, result)
    shutdown_distributed()


if __name__ == "__main__":
    main()
