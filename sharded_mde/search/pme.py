"""PME search: token-wise sizes from a standardised saliency at initialisation, then one table per (field, size) group.

`run_pme` scores the freshly initialised full model for `search.pme.score_fraction` of an epoch
(pme_score: E x dL/dE per entry and its noise, each rank its own shards), gives every token a legal
size by value per byte under the exact byte budget (pme_select: groups, projections and routing
counted while choosing; pruned tokens share their field's out-of-vocabulary row), renumbers every
field's vocabulary group by group and writes a copy of the data in the new ids (pme_data), so the
compact model needs no remap at training or serving. `compact_pme` builds that model for `retrain`:
a `TokenGroupEBC` (one plain EBC of the group tables, sharded by TorchRec's sharders) under the
run's head.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from sharded_mde.config import RunConfig
from sharded_mde.data.meta import DatasetMeta
from sharded_mde.modules.model import RecTrain, build_model
from sharded_mde.modules.token_groups import TokenGroupEBC, combine_of, fields_from_dims
from sharded_mde.dims import DimsFile, PmeRecord, TableDims, TokenGroup
from sharded_mde.plan.tables import full_table_configs, plan_tables
from sharded_mde.search.budget import budget_bytes, full_bytes
from sharded_mde.search.pme_data import (NUM_RESERVED, OOV_ID, plot_token_sizes, renumber_data, scoring_batches, split_counts, tail_rate,
                                         token_order, token_stats)
from sharded_mde.search.pme_score import PooledCapture, TokenScores, score_tokens
from sharded_mde.search.pme_select import ByteModel, Selection, select_sizes, table_selection_bytes
from sharded_mde.search.report import save_search_result
from sharded_mde.train.distributed import DistEnv
from sharded_mde.train.sharding import wrap_model

WEIGHT_DTYPE = "fp32"  # tables train in fp32
HELD_OUT_PRIOR = 0.1  # held-out count given to every token: one unseen there still outranks a wider row for another


def served_windows(data_dir: str | Path, split: str,
                   tables: List[EmbeddingBagConfig]) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Per table, each token's count in the serve split, in as many rows just before it, and in all rows before that.

    The serve split is `valid` or `recent`: the last training rows, as many as validation has, the
    selection's stand-in for validation when its settings are chosen on validation AUC (it then reads
    the period just before the one it is scored on, as `valid` does for test).
    """
    rows = DatasetMeta.load(data_dir).rows
    n, w = rows["train"], rows["valid"]
    if split == "recent":
        return (split_counts(data_dir, "train", tables, start=max(0, n - w)),
                split_counts(data_dir, "train", tables, start=max(0, n - 2 * w), stop=max(0, n - w)),
                split_counts(data_dir, "train", tables, stop=max(0, n - 2 * w)))
    return (split_counts(data_dir, split, tables), split_counts(data_dir, "train", tables, start=max(0, n - w)),
            split_counts(data_dir, "train", tables, stop=max(0, n - w)))


def carry_over(served: np.ndarray, last: np.ndarray, earlier: np.ndarray) -> Tuple[float, float]:
    """(a, b) >= 0 of least squares served ~ a x last + b x earlier', earlier' = `earlier` scaled to `last`'s rows.

    How a field's token counts carry into the next window: from the window just before (a; about 1 for
    movies) and from the whole history (b; the ages or occupations of users still to come). For users of
    MovieLens-100K both are near 0: a user rates in one burst and leaves.
    """
    y, x1 = served[NUM_RESERVED:].astype(float), last[NUM_RESERVED:].astype(float)
    x2 = earlier[NUM_RESERVED:].astype(float) * x1.sum() / max(float(earlier[NUM_RESERVED:].sum()), 1.0)
    x = np.stack([x1, x2], 1)
    if not x.any():
        return 1.0, 0.0
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    if (coef >= 0).all():
        return float(coef[0]), float(coef[1])
    single = [max(0.0, float(c @ y) / max(float(c @ c), 1e-12)) for c in (x1, x2)]
    fits = [((y - single[0] * x1) ** 2).sum(), ((y - single[1] * x2) ** 2).sum()]
    return (single[0], 0.0) if fits[0] <= fits[1] else (0.0, single[1])


def served_weights(data_dir: str | Path, split: str, tables: List[EmbeddingBagConfig],
                   carry: bool = False) -> Dict[str, np.ndarray]:
    """Per table, each token's (served count + prior) / training count: its value's share that serving sees.

    The value estimates n |mu|^2 / sigma^2 over the n training rows; times this weight it is the same
    evidence per row counted over the served rows instead, so a token that stops occurring (a user
    of the training period only) is worth little and one still served keeps its row. With `carry` the
    served count is replaced by its field's `carry_over` forecast of the next window (a x served count +
    b x training count scaled to the served rows), fitted on the windows before: the period after the
    served one is what the model is scored on.
    """
    served, last, earlier = served_windows(data_dir, split, tables)
    # the windows cover the training rows once: the last two (valid), or all three (recent, served from train)
    train = {n: last[n] + earlier[n] + (served[n] if split == "recent" else 0) for n in last}
    out = {}
    for n in train:
        a, b = carry_over(served[n], last[n], earlier[n]) if carry else (1.0, 0.0)
        scale = served[n][NUM_RESERVED:].sum() / max(float(train[n][NUM_RESERVED:].sum()), 1.0)
        out[n] = (a * served[n] + b * scale * train[n] + HELD_OUT_PRIOR) / np.maximum(train[n], 1)
    return out


def row_values(data_dir: str | Path, tables: List[EmbeddingBagConfig], per_row: float, scored: float) -> Dict[str, np.ndarray]:
    """Per table, `per_row` x each token's scored rows (its training count x the `scored` share of an epoch).

    The saliency at initialisation sees only a token's first-order evidence (how its labels depart from
    its field's): the other fields' rows are random then, so what a trained row learns about its
    interactions with them is invisible, and it grows with the rows the token is seen in.
    """
    return {n: per_row * scored * c.astype(float) for n, c in split_counts(data_dir, "train", tables).items()}


def tail_tables(data_dir: str | Path, serve_split: str, tables: List[EmbeddingBagConfig]) -> List[str]:
    """Tables whose out-of-vocabulary row is trained (`search.pme.tail_share`): those whose OOV id `serve_split` reads.

    Without a serve split every table. A field whose served values were all seen in training (gender, hour)
    never reads its OOV row except for pruned tokens, so neither the row nor a share of its rows is spent on it.
    """
    if not serve_split:
        return [t.name for t in tables]
    served = split_counts(data_dir, "valid" if serve_split == "recent" else serve_split, tables)
    return [t.name for t in tables if served[t.name][OOV_ID] > 0]


def scoring_tables(tables: List[EmbeddingBagConfig], scale: float) -> List[EmbeddingBagConfig]:
    """The full tables, every one initialised uniform(-scale, scale) so that saliencies compare across fields."""
    return [dataclasses.replace(t, weight_init_min=-scale, weight_init_max=scale) for t in tables]


def build_scorer(cfg: RunConfig, tables: List[EmbeddingBagConfig], features: List[str], dense_in: int) -> RecTrain:
    """The run's model at initialisation with its EBC wrapped in a PooledCapture (EBC on the meta device)."""
    torch.manual_seed(cfg.train.seed)  # the same dense initialisation on every rank
    ebc = EmbeddingBagCollection(tables=scoring_tables(tables, cfg.search.pme.init_scale), device=torch.device("meta"))
    return build_model(cfg.model, tables, features, dense_in, sparse_arch=PooledCapture(ebc))


def score_run(cfg: RunConfig, env: DistEnv, tables: List[EmbeddingBagConfig]) -> Tuple[TokenScores, Dict[str, float]]:
    """Scores the run's training data from the start of epoch 0 for `score_fraction` of an epoch."""
    from sharded_mde.data import num_batches
    from sharded_mde.train.run import sharding_plan

    t0 = time.perf_counter()
    meta = DatasetMeta.load(cfg.data.dir)
    model = build_scorer(cfg, tables, meta.sparse_features, len(meta.dense_features))
    dmp = wrap_model(model, sharding_plan(model, tables, cfg, env), cfg.train, env.device)
    epoch = num_batches(cfg.data.dir, "train", cfg.train.batch_size, env.world_size)
    n = max(1, round(cfg.search.pme.score_fraction * epoch))
    setup = time.perf_counter() - t0
    batches = scoring_batches(cfg.data.dir, cfg.train.batch_size, n, env.rank, env.world_size)
    scores = score_tokens(dmp, tables, batches, n, env.device, cfg.train.progress)
    return scores, {"setup_seconds": setup, "score_seconds": scores.seconds, "score_batches": scores.batches,
                    "epoch_batches": epoch}


def table_result(t: EmbeddingBagConfig, sizes: np.ndarray, legal: List[int], model: ByteModel) -> Tuple[TableDims, List[int]]:
    """One table's dims entry (groups, bytes with projections and routing) and the size of each reserved id."""
    hist = [int((sizes == s).sum()) for s in legal]
    groups = [TokenGroup(s, n, model.group(n, s)) for s, n in zip(legal, hist) if n]
    return TableDims(name=t.name, features=list(t.feature_names), num_embeddings=t.num_embeddings, full_dim=t.embedding_dim,
                     dim=max(g.size for g in groups), kept_columns=[], bytes=table_selection_bytes(t, sizes, legal, model),
                     groups=groups), [int(s) for s in sizes[:NUM_RESERVED]]


def make_pme_dims(cfg: RunConfig, tables: List[EmbeddingBagConfig], sel: Selection, model: ByteModel,
                  pme: PmeRecord, extra: Optional[Dict[str, Any]] = None, data_dir: Optional[str] = None) -> DimsFile:
    """The dims file of a selection: per table its token groups and bytes; `pme` gets the reserved-id sizes."""
    optimizer = cfg.train.embedding_optimizer
    entries, reserved = [], {}
    for t in tables:
        entry, reserved[t.name] = table_result(t, sel.sizes[t.name].numpy(), sel.legal[t.name], model)
        entries.append(entry)
    pme.reserved_sizes = reserved
    return DimsFile(method="pme", budget_fraction=cfg.search.budget,
                    budget_bytes=budget_bytes(tables, cfg.search.budget, WEIGHT_DTYPE, optimizer),
                    full_bytes=full_bytes(tables, WEIGHT_DTYPE, optimizer), kept_bytes=sum(e.bytes for e in entries),
                    tables=entries, weight_dtype=WEIGHT_DTYPE, optimizer=optimizer, data_dir=data_dir, pme=pme,
                    extra=dict(extra or {}))


def run_pme(cfg: RunConfig, env: DistEnv, stage: str = "pme", ranks: Optional[Dict[str, int]] = None) -> DimsFile:
    """Scores, selects and renumbers; writes `<run_dir>/<stage>/` dims.json, search.png, stats and renumbered data."""
    pme = cfg.search.pme
    tables = full_table_configs(cfg)
    out = Path(cfg.run_dir) / stage
    t_start = time.perf_counter()
    scores, timing = score_run(cfg, env, tables)
    optimizer = cfg.train.embedding_optimizer
    model = ByteModel(WEIGHT_DTYPE, optimizer, cfg.train.dense_optimizer, pme.combine)
    budget = budget_bytes(tables, cfg.search.budget, WEIGHT_DTYPE, optimizer)
    t0 = time.perf_counter()
    weights = served_weights(cfg.data.dir, pme.serve_split, tables, pme.serve_carry) if pme.serve_split else None
    added = (row_values(cfg.data.dir, tables, pme.row_value, min(1.0, timing["score_batches"] / timing["epoch_batches"]))
             if pme.row_value else None)
    tails = tail_tables(cfg.data.dir, pme.serve_split, tables) if pme.tail_share else []
    sel = select_sizes(scores, budget, model, pme.sizes, pme.half_life, weights, added, tails)
    timing["select_seconds"] = time.perf_counter() - t0
    dims = None
    if env.is_main:
        t0 = time.perf_counter()
        order = {t.name: token_order(sel.sizes[t.name].numpy()) for t in tables}
        data_dir = out / "data"
        counts = split_counts(cfg.data.dir, "train", tables) if pme.tail_share else {}
        rates = {f: tail_rate(counts[t.name], order[t.name], pme.tail_share) for t in tables for f in t.feature_names
                 if t.name in tails}
        renumber_data(cfg.data.dir, data_dir, {f: order[t.name] for t in tables for f in t.feature_names}, rates,
                      cfg.train.seed)
        timing["renumber_seconds"] = time.perf_counter() - t0
        timing["search_seconds"] = time.perf_counter() - t_start
        record = PmeRecord(combine=pme.combine, tokens=token_stats(cfg.data.dir, tables, sel.sizes), price=sel.price,
                           selected_bytes=sel.bytes, timing=timing)
        settings = {"search": {"budget": cfg.search.budget, **dataclasses.asdict(pme)}, "tail_rates": rates}
        dims = make_pme_dims(cfg, tables, sel, model, record, settings, str(data_dir))
        if dims.kept_bytes > dims.budget_bytes:
            raise RuntimeError(f"PME kept {dims.kept_bytes} B over the budget {dims.budget_bytes} B")
        save_search_result(out, dims, None, ranks)
        plot_token_sizes(out / "pme_sizes.png", record.tokens, ranks)
    if env.world_size > 1:
        box = [dims]
        dist.broadcast_object_list(box, src=0)
        dims = box[0]
    return dims


def compact_pme(cfg: RunConfig, dims: DimsFile, full: List[EmbeddingBagConfig],
                meta: Any) -> Tuple[RecTrain, List[EmbeddingBagConfig], None]:
    """The compact model of a PME dims file: TokenGroupEBC (group tables on the meta device) under the run's head.

    It reads ids renumbered group by group, i.e. the data copy named by the dims file's `data_dir`.
    """
    copy = dims.data_dir
    if not copy:
        raise ValueError("PME dims file without data_dir (the renumbered data written by the search)")
    if DatasetMeta.load(copy).fingerprint != DatasetMeta.load(cfg.data.dir).fingerprint:
        raise ValueError(f"{copy}: renumbered from other data than {cfg.data.dir} (it was prepared again since "
                         "the search); run the PME search again")
    fields = fields_from_dims(dims, full)
    if not fields:
        raise ValueError("the dims file keeps no token of any field")
    tables = plan_tables(dims, full)
    sparse = TokenGroupEBC(fields, tables, combine_of(dims, cfg.search.pme.combine), device=torch.device("meta"))
    widths = {f.feature: f.out_dim for f in fields}
    head_tables = [dataclasses.replace(t, embedding_dim=widths[t.feature_names[0]]) for t in full
                   if t.feature_names[0] in widths]
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, head_tables, meta.sparse_features, len(meta.dense_features), sparse_arch=sparse)
    return model, tables, None
