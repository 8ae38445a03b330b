"""How many embedding directions a trained model really uses: per-table spectra and truncated AUC.

For every table of a trained model (the newest checkpoint of a stage, by default the `baseline`
of `sharded-mde train`), the covariance of its rows weighted by their training counts (the
vocabulary's `count`) gives the table's principal directions. The tool reports per table the
share of that variance in the top 1 and 4 directions and the effective rank (participation ratio
(sum s)^2 / sum s^2), then scores the test split with every table replaced by its projection onto
its top k directions, for each k of `--ks`. On planted synthetic data it adds the planted rank of
every field and the Spearman correlation between effective and planted ranks: a search that reads
importance from training can only find ranks that training put into the tables. With the
factorised teacher it also reports each table's planted share: the part of its weighted row
variance that a least-squares fit on the teacher's token vectors explains (the rest is what
training added that the teacher does not use, which lifts the effective rank of a low-rank table).

    .venv/bin/python tools/learned_rank.py configs/ham_planted.yaml --out docs/learned_rank.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping

import numpy as np
import pyarrow.parquet as pq
import torch

from sharded_mde.bench.common import save_results
from sharded_mde.config import RunConfig, load_config, parse_overrides
from sharded_mde.data import DatasetMeta
from sharded_mde.data.synth import load_ground_truth, make_teacher, synth_fingerprint, synth_schema
from sharded_mde.data.vocab import vocab_path
from sharded_mde.io import atomic_write_text
from sharded_mde.modules.model import build_model
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.run import planted_ranks
from sharded_mde.search.report import spearman
from sharded_mde.search.retrain import load_dense, read_supernet, table_warm_start
from sharded_mde.train.distributed import DistEnv, init_distributed, shutdown_distributed, tune_cpu_process
from sharded_mde.train.run import sharding_plan
from sharded_mde.train.sharding import wrap_model
from sharded_mde.train.trainer import Trainer


def row_weights(data_dir: str | Path, feature: str, rows: int) -> torch.Tensor:
    """Training count of every row of a field's table (reserved ids, which have no count: 0)."""
    vocab = pq.read_table(str(vocab_path(data_dir, feature)), columns=["id", "count"])
    w = torch.zeros(rows, dtype=torch.float64)
    w[torch.from_numpy(vocab.column("id").to_numpy().astype(np.int64))] = torch.from_numpy(
        vocab.column("count").to_numpy().astype(np.float64))
    return w


def principal_directions(table: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted mean row, variances in descending order, directions as columns) of a table's rows."""
    p = weights / weights.sum().clamp_min(1e-30)
    x = table.double()
    mean = (p[:, None] * x).sum(0)
    centred = (x - mean) * p.sqrt()[:, None]
    var, vec = torch.linalg.eigh(centred.T @ centred)
    return mean, var.flip(0).clamp_min(0), vec.flip(1)


def truncate(table: torch.Tensor, mean: torch.Tensor, vec: torch.Tensor, k: int) -> torch.Tensor:
    """Every row projected onto the top-k principal directions (around the weighted mean)."""
    v = vec[:, :k]
    return (mean + (table.double() - mean) @ v @ v.T).to(table.dtype)


def spectrum_stats(var: torch.Tensor) -> Dict[str, float]:
    """Top-1 and top-4 variance shares, participation ratio and the directions holding 95% of the variance."""
    total = float(var.sum())
    share = torch.cumsum(var, 0) / max(total, 1e-30)
    return {"top1_share": float(share[0]), "top4_share": float(share[min(3, len(var) - 1)]),
            "effective_rank": total ** 2 / max(float((var * var).sum()), 1e-30),
            "k95": int((share < 0.95).sum()) + 1}


def planted_share(table: torch.Tensor, weights: torch.Tensor, vectors: np.ndarray) -> float:
    """Share of the count-weighted, centred row variance of `table` explained linearly by the planted vectors."""
    p = (weights / weights.sum().clamp_min(1e-30)).sqrt()[:, None]
    x, e = table.double(), torch.from_numpy(vectors).double()
    x = (x - (p * p * x).sum(0)) * p
    e = (e - (p * p * e).sum(0)) * p
    u, sv, _ = torch.linalg.svd(e, full_matrices=False)  # planted vectors are rank r_f < K: project on their span
    q = u[:, sv > sv.max() * 1e-8] if sv.numel() and sv.max() > 0 else u[:, :0]
    fit = q @ (q.T @ x)
    return float((fit * fit).sum() / (x * x).sum().clamp_min(1e-30))


def table_vectors(cfg: RunConfig, features: List[str], rows: Mapping[str, int]) -> Dict[str, np.ndarray]:
    """The factorised teacher's token vector of every table row ([rows, K], reserved ids 0), else {}."""
    if cfg.data.format != "synth" or cfg.data.synth_teacher != "factorised":
        return {}
    truth = load_ground_truth(Path(cfg.data.dir) / "ground_truth.json")
    if truth is None or truth.get("fingerprint") != synth_fingerprint(cfg.data):
        print(f"{cfg.data.dir}: ground_truth.json is not from this config's generator settings; no planted share",
              file=sys.stderr)
        return {}
    teacher, fields = make_teacher(cfg.data), list(synth_schema(cfg.data).sparse)
    out = {}
    for feature in features:
        vocab = pq.read_table(str(vocab_path(cfg.data.dir, feature)), columns=["value", "id"])
        e = np.zeros((rows[feature], cfg.data.synth_latent_dim), dtype=np.float32)
        e[vocab.column("id").to_numpy().astype(np.int64)] = teacher.value_vectors(
            fields.index(feature), vocab.column("value").to_pylist())
        out[feature] = e
    return out


def evaluate_with(cfg: RunConfig, env: DistEnv, meta: DatasetMeta, tables: List[Any],
                  weights: Mapping[str, torch.Tensor], dense: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Test AUC and log loss of the full model with the given table weights and dense tensors."""
    model = build_model(cfg.model, tables, meta.sparse_features, len(meta.dense_features))
    load_dense(model, dense)
    dmp = wrap_model(model, sharding_plan(model, tables, cfg, env), cfg.train, env.device)
    table_warm_start(dict(weights))(dmp)
    return Trainer(dmp, cfg.train, env, cfg.data.dir).evaluate("test")


def to_markdown(command: str, result: Dict[str, Any]) -> str:
    """The report: AUC per truncation, then the per-table spectra."""
    lines = ["# Embedding directions a trained model uses", "", f"Produced by `{command}` on the final checkpoint "
             f"of `{result['checkpoint']}` (made by `{result['train_command']}`).", "", "| directions kept per table | test AUC | test logloss |", "|---|---|---|"]
    for row in result["truncations"]:
        lines.append(f"| {row['k']} | {row['auc']:.4f} | {row['logloss']:.4f} |")
    planted = result.get("planted")
    share = any("planted_share" in t for t in result["tables"])
    lines += ["", "| table | rows | planted rank | top-1 share | top-4 share | effective rank | directions for 95% |"
              + (" planted share |" if share else ""), "|---|---|---|---|---|---|---|" + ("---|" if share else "")]
    for t in result["tables"]:
        rank = "" if t.get("planted_rank") is None else t["planted_rank"]
        lines.append(f"| {t['name']} | {t['rows']:,} | {rank} | {t['top1_share']:.3f} | {t['top4_share']:.3f} | "
                     f"{t['effective_rank']:.2f} | {t['k95']} |" + (f" {t['planted_share']:.3f} |" if share else ""))
    if share:
        lines += ["", "Planted share: the part of a table's count-weighted row variance that a least-squares fit on the "
                  "teacher's token vectors explains (rank-0 tables: 0)."]
    if planted:
        lines += ["", f"Spearman correlation of effective rank with planted rank: {planted['spearman_all']:.3f} over all "
                  f"tables, {planted['spearman_informative']:.3f} over the tables planted at rank > 0."]
    lines.append(f"\nMachine: {result['machine'].get('cpu', '?')}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--stage", default="baseline", help="the trained stage under run_dir (default: baseline)")
    p.add_argument("--ks", default="1,2,4,8", help="directions kept per table in the truncated evaluations")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="docs/learned_rank.md")
    args = p.parse_args()
    cfg = load_config(args.config, parse_overrides(args.overrides))
    tune_cpu_process()
    env = init_distributed(prefer_cuda=False)
    meta = DatasetMeta.load(cfg.data.dir)
    tables = full_table_configs(cfg)
    ckpt = Path(cfg.run_dir) / args.stage / "checkpoints"
    weights, dense = read_supernet(ckpt, {t.name: range(t.embedding_dim) for t in tables})
    ranks = planted_ranks(cfg) or {}
    vectors = table_vectors(cfg, [t.feature_names[0] for t in tables], {t.feature_names[0]: t.num_embeddings for t in tables})
    directions, rows = {}, []
    for t in tables:
        feature = t.feature_names[0]
        counts = row_weights(cfg.data.dir, feature, t.num_embeddings)
        mean, var, vec = principal_directions(weights[t.name], counts)
        directions[t.name] = (mean, vec)
        rows.append({"name": t.name, "feature": feature, "rows": t.num_embeddings,
                     "planted_rank": ranks.get(feature), **spectrum_stats(var)})
        if feature in vectors:
            rows[-1]["planted_share"] = planted_share(weights[t.name], counts, vectors[feature])
    truncations = []
    for k in [int(x) for x in args.ks.split(",")] + [max(t.embedding_dim for t in tables)]:
        cut = {n: truncate(weights[n], mean, vec, k) for n, (mean, vec) in directions.items()}
        truncations.append({"k": k, **evaluate_with(cfg, env, meta, tables, cut, dense)})
        print(f"top {k} directions per table: test AUC {truncations[-1]['auc']:.4f}", file=sys.stderr)
    sets = [x for s in args.overrides for x in ("--set", s)]
    train = " ".join(["sharded-mde train", args.config] + sets) if args.stage == "baseline" else f"the {args.stage} stage"
    result: Dict[str, Any] = {"config": args.config, "checkpoint": str(ckpt), "train_command": train, "tables": rows,
                              "truncations": truncations}
    if ranks:
        eff, planted = np.array([r["effective_rank"] for r in rows]), np.array([r["planted_rank"] for r in rows], float)
        informative = planted > 0
        result["planted"] = {"spearman_all": spearman(eff, planted),
                             "spearman_informative": spearman(eff[informative], planted[informative])}
    doc = save_results(Path(args.out).with_suffix(".json"), "learned_rank", result)
    result["machine"] = doc["machine"]
    command = " ".join(["python tools/learned_rank.py", args.config] + sets + ["--out", args.out])
    text = to_markdown(command, result)
    atomic_write_text(Path(args.out), text)
    print(text)
    shutdown_distributed()


if __name__ == "__main__":
    main()
