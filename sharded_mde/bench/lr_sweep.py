"""`sharded-mde bench lr`: the full model's learning rates, chosen on the validation split.

For every (embedding_lr, dense_lr) of the grid and every seed, the full-dimension model trains as
`sharded-mde train` would (the config's epochs, batch size, optimizers) and is scored on the whole
validation split; the pair with the highest mean validation AUC over seeds is chosen. The test
split plays no part in the choice and is not reported. Each grid point is a `baseline` stage in
`<run_dir>/lr_sweep/e<lr>_d<lr>_s<seed>/` with its own ledger, so a rerun skips finished points.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from sharded_mde.bench.paired import mean_std
from sharded_mde.config import RunConfig
from sharded_mde.io import atomic_write_json, atomic_write_text
from sharded_mde.pipeline.ledger import StageLedger
from sharded_mde.pipeline.run import run_pipeline
from sharded_mde.train.distributed import DistEnv

SWEEP_DIR = "lr_sweep"


def parse_lrs(text: str, flag: str) -> List[float]:
    """`"0.01,0.05"` -> [0.01, 0.05]; every rate positive, none repeated."""
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated positive numbers, e.g. 0.01,0.05,0.2") from None
    if not lrs or min(lrs) <= 0 or len(set(lrs)) != len(lrs):
        raise ValueError(f"{flag} {text!r}: expected distinct positive numbers")
    return lrs


def point_config(cfg: RunConfig, embedding_lr: float, dense_lr: float, seed: int) -> RunConfig:
    """One grid point: the rates and seed set, the whole validation split scored, its own run directory."""
    train = dataclasses.replace(cfg.train, embedding_lr=embedding_lr, dense_lr=dense_lr, seed=seed, eval_batches=0)
    name = f"e{embedding_lr:g}_d{dense_lr:g}_s{seed}"
    return dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir) / SWEEP_DIR / name), train=train)


def _train_full(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
    from sharded_mde.train.run import train_stage

    _, m = train_stage(cfg, env, "baseline")
    return {"valid": m["valid"], "train_seconds": m["train_seconds"]}


def run_lr_sweep(cfg: RunConfig, env: DistEnv, embedding_lrs: Sequence[float], dense_lrs: Sequence[float],
                 seeds: int) -> Optional[Dict[str, Any]]:
    """Trains every missing grid point on every rank; rank 0 returns the table and the chosen pair (None elsewhere)."""
    records = []
    for e, d, s in itertools.product(embedding_lrs, dense_lrs, range(seeds)):
        done = run_pipeline(point_config(cfg, e, d, s), env, [("baseline", _train_full, True)])
        out = done["baseline"]["outputs"]
        records.append({"embedding_lr": e, "dense_lr": d, "seed": s, "valid_auc": out["valid"]["auc"],
                        "valid_logloss": out["valid"]["logloss"], "train_seconds": out["train_seconds"]})
    if not env.is_main:
        return None
    grid = []
    for e, d in itertools.product(embedding_lrs, dense_lrs):
        rs = [r for r in records if (r["embedding_lr"], r["dense_lr"]) == (e, d)]
        grid.append({"embedding_lr": e, "dense_lr": d, "valid_auc": mean_std([r["valid_auc"] for r in rs]),
                     "valid_logloss": mean_std([r["valid_logloss"] for r in rs])})
    best = max(grid, key=lambda g: g["valid_auc"]["mean"])
    return {"embedding_lrs": list(embedding_lrs), "dense_lrs": list(dense_lrs), "seeds": seeds,
            "train": {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in ("embedding_lr", "dense_lr", "seed")},
            "records": records, "grid": grid,
            "best": {"embedding_lr": best["embedding_lr"], "dense_lr": best["dense_lr"], "valid_auc": best["valid_auc"]}}


def sweep_markdown(doc: Dict[str, Any]) -> str:
    """Validation AUC (mean ± std over seeds): embedding_lr rows x dense_lr columns, the chosen pair in bold."""
    best = doc["best"]
    cell = {(g["embedding_lr"], g["dense_lr"]): g["valid_auc"] for g in doc["grid"]}
    lines = [f"Validation AUC of the full model (whole validation split, mean ± std over {doc['seeds']} seed(s)); "
             f"rows: `train.embedding_lr`, columns: `train.dense_lr`. Optimizers: {doc['train']['embedding_optimizer']} "
             f"(tables), {doc['train']['dense_optimizer']} (dense); batch {doc['train']['batch_size']} per rank, "
             f"{doc['train']['epochs']:g} epoch(s).", "",
             "| embedding_lr \\ dense_lr | " + " | ".join(f"{d:g}" for d in doc["dense_lrs"]) + " |",
             "|---" * (len(doc["dense_lrs"]) + 1) + "|"]
    for e in doc["embedding_lrs"]:
        cells = []
        for d in doc["dense_lrs"]:
            s = cell[e, d]
            text = f"{s['mean']:.4f} ± {s['std']:.4f}"
            cells.append(f"**{text}**" if (e, d) == (best["embedding_lr"], best["dense_lr"]) else text)
        lines.append(f"| {e:g} | " + " | ".join(cells) + " |")
    lines += ["", f"Chosen: `train.embedding_lr: {best['embedding_lr']:g}`, `train.dense_lr: {best['dense_lr']:g}` "
              f"(validation AUC {best['valid_auc']['mean']:.4f})."]
    if doc.get("command"):
        lines += ["", f"Command: `{doc['command']}`"]
    return "\n".join(lines) + "\n"


def write_sweep(doc: Dict[str, Any], out_md: str | Path) -> None:
    """The markdown table to `out_md` and the JSON next to it (.json)."""
    out_md = Path(out_md)
    atomic_write_text(out_md, sweep_markdown(doc))
    atomic_write_json(out_md.with_suffix(".json"), doc)
