"""HAM search: train the hard-masked supernet under the budget controller, then select legal dims.

The supernet is the run's model with a `MaskedEmbeddingBagCollection` as its sparse arch, trained
by the ordinary trainer (DMP, fused table optimizer, Adam for dense parameters) for
`search.epochs`; `BudgetController` takes the mask step and steers lambda after every optimizer
step; `select_dims` turns the
final mask values into kept columns that meet the byte budget exactly. The final checkpoint stays
in `<stage>/checkpoints` for retraining with a warm start.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from sharded_mde.config import RunConfig
from sharded_mde.modules.masked_ebc import MaskedEmbeddingBagCollection, find_gate
from sharded_mde.modules.model import RecTrain, build_model
from sharded_mde.plan.dims import DimsFile
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.budget import BudgetController, budget_bytes, make_dims_file, select_dims
from sharded_mde.search.report import save_search_result
from sharded_mde.train.distributed import DistEnv

WEIGHT_DTYPE = "fp32"  # tables train in fp32


def build_supernet(cfg: RunConfig, tables: List, features: List[str], dense_in: int,
                   device: torch.device = torch.device("meta")) -> RecTrain:
    """The run's model over a MaskedEmbeddingBagCollection of the full tables (EBC on `device`)."""
    s = cfg.search
    masked = MaskedEmbeddingBagCollection(
        tables, device=device, surrogate=s.surrogate, mask_init=s.mask_init, ortho_weight=s.ortho_weight, ortho_rows=s.ortho_rows,
        ortho_every=s.ortho_every, weight_dtype=WEIGHT_DTYPE,
        optimizer=cfg.train.embedding_optimizer, uniform_price=s.uniform_price)
    return build_model(cfg.model, tables, features, dense_in, sparse_arch=masked, device=device)


def run_ham(cfg: RunConfig, env: DistEnv, stage: str = "ham", ranks: Optional[Dict[str, int]] = None) -> DimsFile:
    """Runs (or resumes) the HAM search in `<run_dir>/<stage>/` and writes its dims file, trace and PNG."""
    from sharded_mde.data import DatasetMeta
    from sharded_mde.train.run import train_stage

    meta = DatasetMeta.load(cfg.data.dir)
    tables = full_table_configs(cfg)
    optimizer = cfg.train.embedding_optimizer
    torch.manual_seed(cfg.train.seed)  # the same initialisation in every run (and on every rank)
    torch.manual_seed(cfg.train.seed)  # the same supernet in every run
    model = build_supernet(cfg, tables, meta.sparse_features, len(meta.dense_features))
    gate = find_gate(model)
    s = cfg.search
    controller = BudgetController(gate, tables, budget_bytes(tables, s.budget, WEIGHT_DTYPE, optimizer), s.dual_lr,
                                  WEIGHT_DTYPE, optimizer, s.warmup, s.prune, s.lambda_init, s.dual_tol, s.mask_lr,
                                  cfg.train.batch_size * env.world_size)
    search_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=cfg.search.epochs))
    t0 = time.perf_counter()
    _, metrics = train_stage(search_cfg, env, stage, model=model, tables=tables, callbacks=[controller])
    values = gate.table_values()
    kept = select_dims(values, tables, cfg.search.budget, cfg.search.allow_drop, WEIGHT_DTYPE, optimizer)
    out = Path(cfg.run_dir) / stage
    extra = {
        "supernet_checkpoints": str(out / "checkpoints"),
        "search": {k: v for k, v in dataclasses.asdict(cfg.search).items() if k != "pme"},
        "supernet_test": metrics["test"],
        "search_seconds": time.perf_counter() - t0,
        "search_steps": metrics["steps"],
        "hard_mask_columns": {t.name: int((values[t.name] > 0).sum()) for t in tables},
        "mask_values": {n: [round(float(x), 6) for x in v] for n, v in values.items()},
    }
    dims = make_dims_file("ham", tables, kept, cfg.search.budget, WEIGHT_DTYPE, optimizer, extra)
    if env.is_main:
        save_search_result(out, dims, controller.trace(), ranks)
    return dims
