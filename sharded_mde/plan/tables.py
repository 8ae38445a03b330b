"""Full and compact table configs: what the model has before the search and what the plan gives it.

`full_table_configs` reads the full tables of a run (from the data stage's meta.json and the model
dims, or from a table preset); `plan_tables` turns a dims file into mixed-dimension
`EmbeddingBagConfig`s, one per kept table and one per PME token group. Tables pool their bags as
`model.pooling` says (sum unless "mean"); a PME group table always sums, because a field's mean is
taken over its whole bag by the token-group module, not per group. `mean_bag_lengths` reads the
data's ids per bag, the planner's pooling factors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType

from sharded_mde.config import ConfigError, ModelConfig, RunConfig, load_yaml
from sharded_mde.data.meta import DatasetMeta
from sharded_mde.io import read_json
from sharded_mde.dims import DimsFile, check_against_tables, group_name, legal_dim, table_name


def full_table_configs(cfg: RunConfig) -> List[EmbeddingBagConfig]:
    """The run's full-dimension tables: `plan.tables_preset` if set, else the data meta.json + model dims."""
    tables = load_table_preset(cfg.plan.tables_preset) if cfg.plan.tables_preset else _data_tables(cfg)
    return with_pooling(tables, cfg.model)


def with_pooling(tables: List[EmbeddingBagConfig], model: ModelConfig) -> List[EmbeddingBagConfig]:
    """`tables` pooling as `model.pooling` says (feature -> sum | mean); a key that feeds no table is a ConfigError."""
    features = {f for t in tables for f in t.feature_names}
    unknown = sorted(set(model.pooling) - features)
    if unknown:
        raise ConfigError(f"model.pooling.{unknown[0]}: not a sparse feature of the tables")
    out = []
    for t in tables:
        modes = {model.pooling.get(f, "sum") for f in t.feature_names}
        if len(modes) > 1:
            raise ConfigError(f"model.pooling: the features of table {t.name} ({', '.join(t.feature_names)}) "
                              "must pool the same way")
        out.append(dataclasses.replace(t, pooling=PoolingType[modes.pop().upper()]))
    return out


def mean_bag_lengths(cfg: RunConfig) -> Dict[str, float]:
    """Mean ids per bag of each sparse feature on the train split (the data's meta.json); {} without data."""
    if not (Path(cfg.data.dir) / "meta.json").is_file():
        return {}
    return dict(DatasetMeta.load(cfg.data.dir).mean_bag_length)


def _data_tables(cfg: RunConfig) -> List[EmbeddingBagConfig]:
    """One table per sparse feature of the data stage's meta.json, at the model's dims."""
    meta_path = Path(cfg.data.dir) / "meta.json"
    meta = read_json(meta_path, "data meta (run `sharded-mde data` first, or set plan.tables_preset)")
    features = meta.get("sparse_features") if isinstance(meta, dict) else None
    rows = meta.get("num_embeddings") if isinstance(meta, dict) else None
    if not isinstance(features, list) or not isinstance(rows, dict):
        raise ValueError(f"{meta_path}: expected sparse_features (list) and num_embeddings (mapping)")
    dims = cfg.model.table_dims
    unknown = [k for k in dims if k not in features and k not in {table_name(f) for f in features}]
    if unknown:
        raise ConfigError(f"model.table_dims.{unknown[0]}: neither a sparse feature nor a table of the data")
    tables = []
    for f in features:
        if not isinstance(rows.get(f), int) or rows[f] < 1:
            raise ValueError(f"{meta_path}: num_embeddings of feature {f} must be a positive integer, got {rows.get(f)!r}")
        dim = dims.get(table_name(f), dims.get(f, cfg.model.embedding_dim))
        tables.append(EmbeddingBagConfig(name=table_name(f), num_embeddings=rows[f], embedding_dim=dim, feature_names=[f]))
    return tables


def load_table_preset(path: str) -> List[EmbeddingBagConfig]:
    """Tables from a preset YAML: `embedding_dim` and `tables: [{feature, num_embeddings, dim?}]`."""
    data = load_yaml(path)
    unknown = sorted(set(data) - {"embedding_dim", "tables", "source"})
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown key (allowed: embedding_dim, source, tables)")
    default_dim = data.get("embedding_dim")
    entries = data.get("tables")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: tables: expected a non-empty list")
    tables, seen = [], set()
    for i, e in enumerate(entries):
        key = f"{path}: tables[{i}]"
        if not isinstance(e, dict) or not set(e) <= {"feature", "num_embeddings", "dim"} or "feature" not in e:
            raise ConfigError(f"{key}: expected a mapping with feature, num_embeddings and optional dim")
        feature, rows, dim = str(e["feature"]), e.get("num_embeddings"), e.get("dim", default_dim)
        if feature in seen:
            raise ConfigError(f"{key}: feature {feature} listed twice")
        seen.add(feature)
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise ConfigError(f"{key}.num_embeddings: a positive integer, got {rows!r}")
        if not legal_dim(dim):
            raise ConfigError(f"{key}.dim: a multiple of 4 (FBGEMM TBE), got {dim!r}")
        tables.append(EmbeddingBagConfig(name=table_name(feature), num_embeddings=rows, embedding_dim=dim, feature_names=[feature]))
    return tables


def plan_tables(dims: DimsFile, full_tables: List[EmbeddingBagConfig]) -> List[EmbeddingBagConfig]:
    """Mixed-dimension tables for a dims file: kept tables at their dim, PME groups as tables; dropped ones omitted.

    Args:
        dims (DimsFile): the search result.
        full_tables (List[EmbeddingBagConfig]): the full tables it was searched on.

    Example::

        compact = plan_tables(dims, tables)
        [(t.name, t.embedding_dim) for t in compact]  # e.g. [("t_C1", 8), ("t_C2", 4)]
    """
    check_against_tables(dims, full_tables)
    out = []
    for full in full_tables:
        t = dims.table(full.name)
        if t.groups:
            for g in sorted(t.groups, key=lambda g: -g.size):
                if g.size and g.rows:
                    out.append(dataclasses.replace(
                        full, name=group_name(full.name, g.size), num_embeddings=g.rows, embedding_dim=g.size,
                        feature_names=[group_name(f, g.size) for f in full.feature_names], pooling=PoolingType.SUM))
        elif t.dim:
            out.append(dataclasses.replace(full, embedding_dim=t.dim))
    return out


def source_tables(compact: List[EmbeddingBagConfig], full: List[EmbeddingBagConfig]) -> Dict[str, str]:
    """Maps each compact table name to the full table it came from (itself, or the table of a PME group)."""
    full_names = {t.name for t in full}
    out: Dict[str, str] = {}
    for t in compact:
        src: Optional[str] = t.name if t.name in full_names else group_source(t.name, full_names)
        if src is None:
            raise ValueError(f"compact table {t.name} matches no full table (nor <table>_s<size> of one)")
        out[t.name] = src
    return out


def group_source(name: str, full_names: Any) -> Optional[str]:
    """The table a PME group table `<table>_s<size>` belongs to, if that table is in `full_names`."""
    base, sep, size = name.rpartition("_s")
    return base if sep and size.isdigit() and base in full_names else None
