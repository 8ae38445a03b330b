"""Sharding plans: TorchRec's planner on the meta device, hand-made plans, and plans as JSON.

`plan_sharding` runs `EmbeddingShardingPlanner` for the topology in `PlanConfig` on a meta-device
EBC, so no GPU (and no process group) is needed to plan for GPUs; the chosen sharding options
(with each shard's rank and the planner's storage estimate) are captured through a `Stats` hook.
A plan saved with `save_plan` is loaded by training with `load_plan` instead of planning again.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import PlannerError, ShardingOption, Stats
from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import (
    EmbeddingModuleShardingPlan,
    EnumerableShardingSpec,
    ParameterSharding,
    ShardingPlan,
    ShardingType,
    ShardMetadata,
)

from sharded_mde.config import ConfigError, PlanConfig
from sharded_mde.io import atomic_write_json, read_json
from sharded_mde.dims import DIM_MULTIPLE
from sharded_mde.plan.tables import group_source

GiB = 1024**3
DEFAULT_FQN = "sparse_arch.ebc"  # where the trainer puts the EBC; plans are keyed by this module path
PLAN_FORMAT_VERSION = 1
SHARDING_TYPES = [t.value for t in ShardingType]
COMPUTE_KERNELS = [k.value for k in EmbeddingComputeKernel]


class PlanningError(ValueError):
    """The planner could not place the tables (or a plan does not match them); names the table or rank."""


def make_topology(cfg: PlanConfig) -> Topology:
    """The planner's Topology for the configured cluster (caps per rank in GiB)."""
    return Topology(
        world_size=cfg.world_size,
        compute_device=cfg.compute_device,
        hbm_cap=int(cfg.hbm_cap_gb * GiB),
        ddr_cap=int(cfg.ddr_cap_gb * GiB),
        local_world_size=cfg.local_world_size or cfg.world_size,
    )


def check_constraint_keys(cfg: PlanConfig, full_tables: Sequence[EmbeddingBagConfig]) -> None:
    """Every key of `plan.constraints` is "*" or a table of the model (ConfigError naming the key)."""
    names = {t.name for t in full_tables}
    for key in cfg.constraints:
        if key != "*" and key not in names:
            raise ConfigError(f"plan.constraints.{key}: not a table of the model")


def planner_constraints(tables: Sequence[EmbeddingBagConfig], cfg: PlanConfig,
                        bag_lengths: Optional[Mapping[str, float]] = None) -> Dict[str, ParameterConstraints]:
    """ParameterConstraints per table from `plan.constraints` ("*", then the source table, then the table itself).

    The pooling factor (ids per bag, which sizes the planner's lookup and communication estimates)
    of each feature is `pooling_factor` if configured, else its mean bag length in `bag_lengths`
    (a PME group feature `<feature>_s<size>` reads its field's), else 1.
    """
    bag_lengths = bag_lengths or {}
    default_types = [t for t in SHARDING_TYPES if cfg.allow_data_parallel or t != ShardingType.DATA_PARALLEL.value]
    out = {}
    for t in tables:
        spec: Dict[str, Any] = {}
        for key in ("*", group_source(t.name, cfg.constraints), t.name):
            spec.update(cfg.constraints.get(key or "", {}))
        types = list(spec.get("sharding_types") or default_types)
        kernels = spec.get("compute_kernels")
        key = f"plan.constraints.{t.name}"
        if not isinstance(types, list) or any(s not in SHARDING_TYPES for s in types):
            raise ConfigError(f"{key}.sharding_types: each one of {SHARDING_TYPES}, got {types!r}")
        if ShardingType.DATA_PARALLEL.value in types and not cfg.allow_data_parallel:
            raise ConfigError(f"{key}.sharding_types: data_parallel needs plan.allow_data_parallel: true")
        if kernels is not None and (not isinstance(kernels, list) or any(k not in COMPUTE_KERNELS for k in kernels)):
            raise ConfigError(f"{key}.compute_kernels: each one of {COMPUTE_KERNELS}, got {kernels!r}")
        pooling = spec.get("pooling_factor")
        if pooling is not None and (isinstance(pooling, bool) or not isinstance(pooling, (int, float)) or pooling <= 0):
            raise ConfigError(f"{key}.pooling_factor: a positive number, got {pooling!r}")
        factors = [float(pooling) if pooling is not None else
                   bag_lengths.get(f, bag_lengths.get(group_source(f, bag_lengths) or "", 1.0)) for f in t.feature_names]
        out[t.name] = ParameterConstraints(sharding_types=types, compute_kernels=kernels,
                                           min_partition=spec.get("min_partition"), pooling_factors=factors)
    return out


class _BestPlan(Stats):
    """Planner Stats hook: keeps the chosen sharding options (or, on failure, the last proposal)."""

    def __init__(self) -> None:
        self.options: List[ShardingOption] = []

    def log(self, *args: Any, **kwargs: Any) -> None:  # the planner passes everything by keyword
        """Stores `best_plan` (a list of ShardingOption with ranks and storage estimates)."""
        self.options = list(kwargs.get("best_plan") or [])


def _count_optimizer_state(ebc: EmbeddingBagCollection, optimizer: str) -> None:
    """Marks the tables' optimizer so the planner's storage estimate includes its state.

    PRIVATE API, isolated here: the planner reads `param._optimizer_classes`, which only
    `torch.distributed.optim._apply_optimizer_in_backward` sets (fused_params are not seen).
    """
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.optim import RowWiseAdagrad

    cls = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad,
           "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
    _apply_optimizer_in_backward(cls, ebc.parameters(), {"lr": 0.01})


@contextlib.contextmanager
def _quiet_planner_logs() -> Iterator[None]:
    """Silences the planner's warnings that do not apply to a dry run (e.g. "use TopologyFactory")."""
    log = logging.getLogger("torchrec.distributed.planner")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def plan_sharding(
    tables: Sequence[EmbeddingBagConfig],
    cfg: PlanConfig,
    optimizer: Optional[str] = None,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
    module_fqn: str = DEFAULT_FQN,
    bag_lengths: Optional[Mapping[str, float]] = None,
) -> Tuple[ShardingPlan, List[ShardingOption]]:
    """Plans `tables` on the configured topology (meta device); returns the plan and the chosen options.

    Args:
        tables (Sequence[EmbeddingBagConfig]): the tables to shard (full or compact).
        cfg (PlanConfig): topology (world size, device, memory caps) and planner constraints.
        optimizer (Optional[str]): the table optimizer whose state is counted (default `cfg.optimizer`).
        constraints (Optional[Dict[str, ParameterConstraints]]): more per-table planner constraints.
        module_fqn (str): the EBC's path in the model the plan is for.
        bag_lengths (Optional[Mapping[str, float]]): the data's mean ids per bag by feature
            (`plan.tables.mean_bag_lengths`), the pooling factors.

    Example::

        plan, options = plan_sharding(compact, PlanConfig(world_size=2))
        DistributedModelParallel(model, plan=plan)  # on 2 ranks
    """
    if not tables:
        raise PlanningError("no tables to plan (every table was dropped)")
    ebc = EmbeddingBagCollection(tables=list(tables), device=torch.device("meta"))
    _count_optimizer_state(ebc, optimizer or cfg.optimizer)
    cons = {**planner_constraints(tables, cfg, bag_lengths), **(constraints or {})}
    reservation = FixedPercentageStorageReservation(cfg.storage_reserve)
    hook = _BestPlan()
    sharders = [EmbeddingBagCollectionSharder()]
    with _quiet_planner_logs():
        topology = make_topology(cfg)
        planner = EmbeddingShardingPlanner(topology=topology, batch_size=cfg.batch_size,
                                           storage_reservation=reservation, stats=[hook], constraints=cons)
        try:
            plan = planner.plan(ebc, sharders)
        except PlannerError as e:
            usable = reservation.reserve(topology, cfg.batch_size, ebc, sharders, cons)
            raise PlanningError(explain_failure(hook.options, usable, cfg, str(e))) from None
    for so in hook.options:
        for sh in so.shards:
            if so.sharding_type != ShardingType.DATA_PARALLEL.value and sh.size[1] % DIM_MULTIPLE:
                raise PlanningError(f"table {so.name}: the planner made a {sh.size[1]}-column shard; FBGEMM needs a "
                                    f"multiple of {DIM_MULTIPLE} (set plan.constraints.{so.name}.min_partition)")
    return ShardingPlan({module_fqn: plan.plan[""]}), hook.options


def explain_failure(options: List[ShardingOption], usable: Topology, cfg: PlanConfig, error: str) -> str:
    """One line naming the table (or rank) that does not fit, from the planner's last proposal."""
    tiers = ("hbm", "ddr") if cfg.compute_device == "cuda" else ("ddr",)
    avail = {t: [getattr(d.storage, t) for d in usable.devices] for t in tiers}
    caps = {"hbm": f"{cfg.hbm_cap_gb:g} GiB HBM less the {cfg.storage_reserve:.0%} reservation", "ddr": f"{cfg.ddr_cap_gb:g} GiB DDR"}
    shards = [(so, sh) for so in options for sh in so.shards]
    first = error.strip().splitlines()[0] if error.strip() else "no plan"
    if not shards:
        return f"the planner found no plan for {cfg.world_size} ranks: {first}"
    need = lambda sh, t: getattr(sh.storage, t)  # noqa: E731
    for t in tiers:  # the whole model does not fit in this tier
        total = sum(need(sh, t) for _, sh in shards)
        if total > sum(avail[t]):
            big = sorted(shards, key=lambda x: -need(x[1], t))[:3]
            largest = ", ".join(f"{so.name} {need(sh, t) / GiB:.2f} GiB" for so, sh in big)
            return (f"no plan fits: the tables need {total / GiB:.2f} GiB of {t.upper()} (largest shards: {largest}) "
                    f"but the {cfg.world_size} ranks hold {sum(avail[t]) / GiB:.2f} GiB ({caps[t]} each)")
    for t in tiers:  # one shard is larger than any rank
        so, sh = max(shards, key=lambda x: need(x[1], t))
        if need(sh, t) > max(avail[t]):
            return (f"no plan fits: table {so.name}'s {so.sharding_type} shard of {sh.size[0]} x {sh.size[1]} needs "
                    f"{need(sh, t) / GiB:.2f} GiB of {t.upper()} but a rank holds at most {max(avail[t]) / GiB:.2f} GiB ({caps[t]})")
    free = {t: list(v) for t, v in avail.items()}
    for so, sh in sorted(shards, key=lambda x: -sum(need(x[1], t) for t in tiers)):  # first-fit decreasing
        fits = [r for r in range(cfg.world_size) if all(need(sh, t) <= free[t][r] for t in tiers)]
        if not fits:
            t = tiers[0]
            r = max(range(cfg.world_size), key=lambda i: free[t][i])
            return (f"no plan fits: table {so.name}'s {sh.size[0]} x {sh.size[1]} shard needs {need(sh, t) / GiB:.2f} GiB of "
                    f"{t.upper()} but the emptiest rank {r} has {free[t][r] / GiB:.2f} GiB left ({caps[t]})")
        r = max(fits, key=lambda i: free[tiers[0]][i])
        for t in tiers:
            free[t][r] -= need(sh, t)
    return f"the planner found no plan for {cfg.world_size} ranks: {first}"


def manual_plan(
    tables: Sequence[EmbeddingBagConfig],
    kind: str,
    world_size: int,
    device_type: str = "cpu",
    compute_kernel: str = EmbeddingComputeKernel.FUSED.value,
    module_fqn: str = DEFAULT_FQN,
    local_size: Optional[int] = None,
) -> ShardingPlan:
    """Every table sharded one way: table_wise (round robin), row_wise, or column_wise (legal column shards).

    Args:
        tables (Sequence[EmbeddingBagConfig]): the tables.
        kind (str): table_wise, row_wise or column_wise.
        world_size (int): ranks.
        device_type (str): cpu or cuda.
        compute_kernel (str): the FBGEMM kernel (default fused).
        module_fqn (str): the EBC's path in the model.
        local_size (Optional[int]): ranks per host (default world_size).

    Example::

        plan = manual_plan(tables, "row_wise", world_size=2, module_fqn="model.sparse_arch.ebc")
    """
    ebc = EmbeddingBagCollection(tables=list(tables), device=torch.device("meta"))
    per_param = {}
    for i, t in enumerate(tables):
        if kind == "table_wise":
            per_param[t.name] = table_wise(rank=i % world_size, compute_kernel=compute_kernel)
        elif kind == "row_wise":
            per_param[t.name] = row_wise(compute_kernel=compute_kernel)
        elif kind == "column_wise":
            k = max(n for n in range(1, world_size + 1) if t.embedding_dim % (DIM_MULTIPLE * n) == 0)
            per_param[t.name] = column_wise(ranks=[(i + j) % world_size for j in range(k)], compute_kernel=compute_kernel)
        else:
            raise ValueError(f"manual_plan: kind must be table_wise, row_wise or column_wise, got {kind!r}")
    module_plan = construct_module_sharding_plan(ebc, per_param, sharder=EmbeddingBagCollectionSharder(),
                                                 local_size=local_size or world_size, world_size=world_size,
                                                 device_type=device_type)
    return ShardingPlan({module_fqn: module_plan})


# --------------------------------------------------------------------------- plan JSON


def plan_to_json(plan: ShardingPlan) -> Dict[str, Any]:
    """The JSON form of a ShardingPlan of embedding modules (sharding type, kernel, ranks, shards)."""
    modules: Dict[str, Any] = {}
    for fqn, module_plan in plan.plan.items():
        entries = {}
        for name, ps in module_plan.items():
            extras = [k for k in ("cache_params", "bounds_check_mode", "output_dtype", "key_value_params")
                      if getattr(ps, k, None) is not None]
            if extras:
                raise ValueError(f"table {name}: {extras[0]} in the plan cannot be saved as JSON yet")
            spec = ps.sharding_spec
            shards = None if spec is None else [
                {"offsets": list(m.shard_offsets), "sizes": list(m.shard_sizes), "placement": str(m.placement)}
                for m in spec.shards]
            entries[name] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                             "ranks": ps.ranks, "shards": shards, "enforce_hbm": ps.enforce_hbm,
                             "stochastic_rounding": ps.stochastic_rounding}
        modules[fqn] = entries
    return {"format_version": PLAN_FORMAT_VERSION, "modules": modules}


def save_plan(path: Union[str, Path], plan: ShardingPlan) -> None:
    """Writes a ShardingPlan as JSON atomically."""
    atomic_write_json(path, plan_to_json(plan))


def load_plan(path: Union[str, Path], tables: Sequence[EmbeddingBagConfig], world_size: Optional[int] = None) -> ShardingPlan:
    """Reads a plan JSON and checks it against `tables` (names, shapes, legal shards, ranks); errors name the table."""
    where = str(path)
    raw = read_json(path, "sharding plan")
    if not isinstance(raw, dict) or raw.get("format_version") != PLAN_FORMAT_VERSION or not isinstance(raw.get("modules"), dict):
        raise PlanningError(f"{where}: not a sharding plan (format_version {PLAN_FORMAT_VERSION} with modules)")
    shapes = {t.name: (t.num_embeddings, t.embedding_dim) for t in tables}
    seen: Dict[str, str] = {}
    plan: Dict[str, EmbeddingModuleShardingPlan] = {}
    for fqn, entries in raw["modules"].items():
        if not isinstance(entries, dict):
            raise PlanningError(f"{where}: module {fqn}: expected an object mapping table names to shardings")
        module_plan = EmbeddingModuleShardingPlan()
        for name, e in entries.items():
            tw = f"{where}: table {name}"
            if name not in shapes:
                raise PlanningError(f"{tw} is not a table of the model (model tables: {', '.join(sorted(shapes)[:8])})")
            if name in seen:
                raise PlanningError(f"{tw} is planned twice ({seen[name]} and {fqn})")
            seen[name] = fqn
            module_plan[name] = _parameter_sharding(e, shapes[name], world_size, tw)
        plan[fqn] = module_plan
    missing = [n for n in shapes if n not in seen]
    if missing:
        raise PlanningError(f"{where}: table {missing[0]} of the model is not in the plan")
    return ShardingPlan(plan)


def _parameter_sharding(e: Any, shape: Tuple[int, int], world_size: Optional[int], tw: str) -> ParameterSharding:
    """One table's ParameterSharding from JSON, checked against the table's shape."""
    if not isinstance(e, dict) or e.get("sharding_type") not in SHARDING_TYPES or e.get("compute_kernel") not in COMPUTE_KERNELS:
        raise PlanningError(f"{tw}: needs a known sharding_type and compute_kernel")
    ranks = e.get("ranks")
    if ranks is not None and (not isinstance(ranks, list) or
                              any(not isinstance(r, int) or r < 0 or (world_size and r >= world_size) for r in ranks)):
        raise PlanningError(f"{tw}: ranks {ranks} are not ranks of a world of {world_size}")
    spec = None
    if e.get("shards") is not None:
        if not isinstance(e["shards"], list) or not all(isinstance(s, dict) for s in e["shards"]):
            raise PlanningError(f"{tw}: shards must be a list of objects with offsets, sizes and placement")
        metas = []
        for s in e["shards"]:
            off, size = s.get("offsets"), s.get("sizes")
            if (not isinstance(off, list) or not isinstance(size, list) or len(off) != 2 or len(size) != 2
                    or not all(type(x) is int for x in off + size)
                    or any(o < 0 for o in off) or any(z < 0 for z in size)
                    or off[0] + size[0] > shape[0] or off[1] + size[1] > shape[1]):
                raise PlanningError(f"{tw}: shard {off} + {size} does not lie inside the table's {shape[0]} x {shape[1]}")
            if e["compute_kernel"] != EmbeddingComputeKernel.DENSE.value and size[1] % DIM_MULTIPLE:
                raise PlanningError(f"{tw}: a {size[1]}-column shard is illegal for FBGEMM (multiple of {DIM_MULTIPLE})")
            try:
                metas.append(ShardMetadata(shard_offsets=off, shard_sizes=size, placement=s.get("placement")))
            except (ValueError, TypeError) as err:
                raise PlanningError(f"{tw}: shard placement {s.get('placement')!r}: {err}") from None
        if sum(m.shard_sizes[0] * m.shard_sizes[1] for m in metas) != shape[0] * shape[1] or _overlap(metas):
            raise PlanningError(f"{tw}: the shards do not tile the table's {shape[0]} x {shape[1]} (wrong dim or rows?)")
        spec = EnumerableShardingSpec(metas)
    elif e["sharding_type"] != ShardingType.DATA_PARALLEL.value:
        raise PlanningError(f"{tw}: a {e['sharding_type']} table needs shards")
    return ParameterSharding(sharding_type=e["sharding_type"], compute_kernel=e["compute_kernel"], ranks=ranks,
                             sharding_spec=spec, enforce_hbm=e.get("enforce_hbm"),
                             stochastic_rounding=e.get("stochastic_rounding"))


def _overlap(metas: List[ShardMetadata]) -> bool:
    """True if any two shards share an element."""
    boxes = [(m.shard_offsets, m.shard_sizes) for m in metas]
    for i, (oa, za) in enumerate(boxes):
        for ob, zb in boxes[i + 1:]:
            if all(oa[d] < ob[d] + zb[d] and ob[d] < oa[d] + za[d] for d in range(2)):
                return True
    return False
