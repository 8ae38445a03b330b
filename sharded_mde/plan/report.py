"""The memory report: full vs compact tables sharded on one topology, per table, shard and rank.

Raw bytes (weights + optimizer state, from `dims.table_bytes` on each shard's rows x cols) are
computed independently of the planner; the planner's estimate (which adds input/output buffers)
is shown beside them. Per rank: the cap (`caps.rank_caps`), the planner's bytes, the headroom and
whether it fits; a table set that does not fit is reported at the smallest cap that does.
Renderers: console text, markdown, JSON (the dict itself) and a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torchrec import EmbeddingBagConfig
from torchrec.distributed.planner.types import ShardingOption
from torchrec.modules.embedding_configs import DataType

from sharded_mde.config import PlanConfig
from sharded_mde.dims import SERVING_DTYPES, legal_serving_dim, serving_bytes_of, serving_table_bytes, table_bytes
from sharded_mde.plan.caps import Fit, Planned, cap_key, cap_tier, checked_tiers, fit_plan, rank_caps
from sharded_mde.plan.sharding import GiB, check_constraint_keys
from sharded_mde.plan.tables import source_tables
from sharded_mde.plots import pyplot, save_png

DTYPES = {DataType.FP32: "fp32", DataType.FP16: "fp16"}
CONSOLE_SHARDS = 15  # largest shards shown on the console (all are in JSON and markdown)


def weight_dtype(table: EmbeddingBagConfig) -> str:
    """The byte-model dtype of a table's weights (fp32 or fp16)."""
    if table.data_type not in DTYPES:
        raise ValueError(f"table {table.name}: weights of {table.data_type} are not in the byte model (fp32, fp16)")
    return DTYPES[table.data_type]


def plan_bytes(tables: Sequence[EmbeddingBagConfig], options: List[ShardingOption], optimizer: str, world: int) -> Dict[str, Any]:
    """Per-table, per-shard and per-rank figures (raw weights and optimizer state, the planner's estimate) of one planned set of tables."""
    by_name = {t.name: t for t in tables}
    shards, per_table = [], {}
    ranks = [{"weight": 0, "optimizer": 0, "total": 0, "planner_hbm": 0, "planner_ddr": 0} for _ in range(world)]
    order = {t.name: i for i, t in enumerate(tables)}
    for so in sorted(options, key=lambda o: order[o.name]):
        t = by_name[so.name]
        tb = table_bytes(t.num_embeddings, t.embedding_dim, weight_dtype(t), optimizer)
        per_table[so.name] = {"name": so.name, "rows": t.num_embeddings, "dim": t.embedding_dim,
                              "sharding_type": so.sharding_type, "compute_kernel": so.compute_kernel,
                              "shards": len(so.shards), "weight": tb.weight, "optimizer": tb.optimizer, "total": tb.total,
                              "pooling_factors": [float(x) for x in so.input_lengths]}
        for i, sh in enumerate(so.shards):
            b = table_bytes(sh.size[0], sh.size[1], weight_dtype(t), optimizer)
            row = {"table": so.name, "index": i, "rank": sh.rank, "offset": list(sh.offset), "rows": sh.size[0],
                   "cols": sh.size[1], "weight": b.weight, "optimizer": b.optimizer, "total": b.total,
                   "planner_hbm": sh.storage.hbm, "planner_ddr": sh.storage.ddr}
            shards.append(row)
            for k in ("weight", "optimizer", "total", "planner_hbm", "planner_ddr"):
                ranks[sh.rank][k] += row[k]
    return {"tables": per_table, "shards": shards, "ranks": ranks}


def serving_bytes_by_dtype(tables: Sequence[EmbeddingBagConfig], row_alignment: int,
                           dtypes: Optional[Mapping[str, str]] = None) -> Dict[str, Optional[int]]:
    """Serving bytes of the tables served as each dtype (`dims.serving_bytes_of`; None where a dim is illegal for it),
    and with `dtypes` (table -> dtype, the dims file's per-table choice) under "per_table": what the export serves."""
    out = {d: serving_bytes_of(tables, d, row_alignment)
           if all(legal_serving_dim(t.embedding_dim, d) for t in tables if t.embedding_dim > 0) else None
           for d in SERVING_DTYPES}
    if dtypes is not None:
        out["per_table"] = sum(serving_table_bytes(t.num_embeddings, t.embedding_dim, dtypes[t.name], row_alignment)
                               for t in tables)
    return out


def _sum(rows: List[Dict[str, int]]) -> Dict[str, int]:
    return {k: sum(r[k] for r in rows) for k in ("weight", "optimizer", "total", "planner_hbm", "planner_ddr")}


def _imbalance(values: List[int]) -> float:
    """Max over mean (1.0 = perfectly balanced)."""
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 1.0


def _pct(saved: int, before: int) -> float:
    return 100.0 * saved / before if before else 0.0


def memory_report(
    full_tables: List[EmbeddingBagConfig],
    compact_tables: List[EmbeddingBagConfig],
    cfg: PlanConfig,
    full_plan: Optional[Union[Planned, Fit]] = None,
    compact_plan: Optional[Union[Planned, Fit]] = None,
    bag_lengths: Optional[Mapping[str, float]] = None,
    row_alignment: int = 1,
    dtypes: Optional[Mapping[str, str]] = None,
) -> Dict[str, Any]:
    """Plans (unless given; pooling factors from `bag_lengths`) the full and compact tables on `cfg`'s topology
    and compares their memory, and each rank's bytes with its cap.

    A table set the planner cannot place on `cfg` is planned at the smallest cap that fits (`caps.fit_plan`);
    `rep["fit"][side]` says so in one line (`line`) and its ranks show negative headroom.

    Args:
        full_tables (List[EmbeddingBagConfig]): the tables before the search.
        compact_tables (List[EmbeddingBagConfig]): `plan_tables` of the dims file.
        cfg (PlanConfig): the topology both are planned on.
        full_plan, compact_plan (Optional): plans already made (`plan_sharding`'s result or `fit_plan`'s Fit).
        bag_lengths (Optional[Mapping[str, float]]): mean ids per bag by feature (pooling factors).
        row_alignment (int): the serving row alignment of the "serving bytes per dtype" totals.
        dtypes (Optional[Mapping[str, str]]): each compact table's serving dtype (`dims.file.serving_dtypes`):
            adds the compact tables' serving bytes as the export serves them ("per_table").

    Example::

        rep = memory_report(tables, compact, PlanConfig(world_size=2))
        print(render_markdown(rep))  # per table and per rank: bytes before and after, cap and headroom
    """
    check_constraint_keys(cfg, full_tables)
    fits = {"full": _as_fit(full_plan, full_tables, cfg, bag_lengths),
            "compact": _as_fit(compact_plan, compact_tables, cfg, bag_lengths)}
    world, opt = cfg.world_size, cfg.optimizer
    full = plan_bytes(full_tables, fits["full"].planned[1], opt, world)
    comp = plan_bytes(compact_tables, fits["compact"].planned[1], opt, world)
    src = source_tables(compact_tables, full_tables)

    tables = []
    for t in full_tables:
        parts = [comp["tables"][c.name] for c in compact_tables if src[c.name] == t.name]
        after = sum(p["total"] for p in parts)
        before = full["tables"][t.name]
        tables.append({"name": t.name, "rows": t.num_embeddings, "dim_before": t.embedding_dim,
                       "dim_after": max((p["dim"] for p in parts), default=0), "full": before, "compact": parts,
                       "saving": before["total"] - after, "saving_pct": _pct(before["total"] - after, before["total"])})

    full_shards = {}
    for s in full["shards"]:
        full_shards.setdefault(s["table"], []).append(s)
    for s in comp["shards"]:  # the same piece of the same table in the full plan, if it was cut the same way
        match = full_shards.get(s["table"], [])
        same_cut = len(match) == comp["tables"][s["table"]]["shards"] and src[s["table"]] == s["table"]
        s["full_total"] = match[s["index"]]["total"] if same_cut else None
        s["saving"] = s["full_total"] - s["total"] if same_cut else None

    tier, caps = cap_tier(cfg), rank_caps(cfg)
    cap = caps[tier]
    ranks = []
    for r in range(world):
        f, c = full["ranks"][r], comp["ranks"][r]
        row: Dict[str, Any] = {"rank": r, "full": f, "compact": c, "cap": cap}
        for side, x in (("full", f), ("compact", c)):
            row[f"bytes_{side}"] = x[f"planner_{tier}"]
            row[f"headroom_{side}"] = cap - x[f"planner_{tier}"]
            row[f"fits_{side}"] = all(x[f"planner_{t}"] <= caps[t] for t in checked_tiers(cfg))
        ranks.append({**row, "saving": f["total"] - c["total"], "saving_pct": _pct(f["total"] - c["total"], f["total"])})
    tf, tc = _sum(full["ranks"]), _sum(comp["ranks"])
    totals = {"full": tf, "compact": tc, "saving": tf["total"] - tc["total"], "saving_pct": _pct(tf["total"] - tc["total"], tf["total"]),
              "max_rank_full": max(r["total"] for r in full["ranks"]), "max_rank_compact": max(r["total"] for r in comp["ranks"]),
              "imbalance_full": _imbalance([r["total"] for r in full["ranks"]]),
              "imbalance_compact": _imbalance([r["total"] for r in comp["ranks"]]),
              "planner_imbalance_full": _imbalance([r[f"planner_{tier}"] for r in full["ranks"]]),
              "planner_imbalance_compact": _imbalance([r[f"planner_{tier}"] for r in comp["ranks"]]),
              "serving": {"row_alignment": row_alignment, "full": serving_bytes_by_dtype(full_tables, row_alignment),
                          "compact": serving_bytes_by_dtype(compact_tables, row_alignment, dtypes)}}
    topology = {"world_size": world, "local_world_size": cfg.local_world_size or world, "compute_device": cfg.compute_device,
                "tier": tier, "capacity_per_rank": int(getattr(cfg, cap_key(cfg)) * GiB), "cap_per_rank": cap,
                "storage_reserve": cfg.storage_reserve if tier == "hbm" else 0.0, "batch_size": cfg.batch_size, "optimizer": opt}
    rep = {"topology": topology, "tables": tables, "shards": {"full": full["shards"], "compact": comp["shards"]},
           "ranks": ranks, "totals": totals}
    rep["fit"] = {side: _fit_record(rep, side, fits[side], cfg) for side in ("full", "compact")}
    return rep


def _as_fit(given: Optional[Union[Planned, Fit]], tables: List[EmbeddingBagConfig], cfg: PlanConfig,
            bag_lengths: Optional[Mapping[str, float]]) -> Fit:
    """A given plan (or Fit) as a Fit; without one, `fit_plan` plans the tables."""
    if given is None:
        return fit_plan(tables, cfg, bag_lengths)
    return given if isinstance(given, Fit) else Fit(given)


def _fit_record(rep: Dict[str, Any], side: str, fit: Fit, cfg: PlanConfig) -> Dict[str, Any]:
    """Whether `side` fits every rank's cap, its busiest rank, and (if not) the smallest cap that fits."""
    busiest = max(rep["ranks"], key=lambda r: r[f"bytes_{side}"])
    rec = {"fits": fit.fits and all(r[f"fits_{side}"] for r in rep["ranks"]), "planner_found_plan": fit.fits,
           "tier": cap_tier(cfg), "cap_key": f"plan.{cap_key(cfg)}", "cap_gb": getattr(cfg, cap_key(cfg)),
           "cap": busiest["cap"], "busiest_rank": busiest["rank"], "busiest_bytes": busiest[f"bytes_{side}"],
           "headroom": busiest[f"headroom_{side}"], "smallest_cap_gb": fit.smallest_cap_gb, "step_gb": fit.step_gb,
           "planner_calls": fit.planner_calls, "planner_error": fit.error}
    return {**rec, "line": fit_line(rec, side, cfg.world_size)}


def fit_line(rec: Dict[str, Any], side: str, world: int) -> str:
    """One line: does `side` fit the caps; if not, its busiest rank and the smallest cap with which the planner fits it."""
    tier = rec["tier"].upper()
    busiest = f"busiest rank {rec['busiest_rank']} needs {fmt_bytes(rec['busiest_bytes'])}"
    caps = f"{world} ranks of {rec['cap_gb']:g} GiB {tier}"
    if rec["fits"]:
        return f"the {side} tables fit {caps}: {busiest} of {fmt_bytes(rec['cap'])} usable ({fmt_bytes(rec['headroom'])} headroom)"
    line = f"{'no plan fits: ' if side == 'compact' else ''}the {side} tables do not fit {caps}"
    if rec["smallest_cap_gb"] is None:
        return f"{line}: {busiest} of {fmt_bytes(rec['cap'])} usable"
    return (f"{line} ({fmt_bytes(rec['cap'])} usable each); the smallest cap with which the planner finds a plan is "
            f"{rec['smallest_cap_gb']!r} GiB {tier} per rank (--set {rec['cap_key']}={rec['smallest_cap_gb']!r}, "
            f"bisection step {rec['step_gb']!r} GiB), where {busiest}")


# --------------------------------------------------------------------------- renderers


def fmt_bytes(n: Optional[float]) -> str:
    """Human-readable binary size (GiB, MiB, KiB, B)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _sections(rep: Dict[str, Any], max_shards: Optional[int]) -> List[Tuple[str, List[List[str]]]]:
    """The report's tables as (title, rows with a header row), shared by the console and markdown renderers."""
    tier = rep["topology"]["tier"].upper()
    tables = [[t["name"], f"{t['rows']:,}", str(t["dim_before"]),
               "dropped" if not t["compact"] else "/".join(str(p["dim"]) for p in t["compact"]),
               f"{t['full']['sharding_type']} -> " + ("-" if not t["compact"] else ",".join(sorted({p["sharding_type"] for p in t["compact"]}))),
               f"{t['full']['compute_kernel']} -> " + ("-" if not t["compact"] else ",".join(sorted({p["compute_kernel"] for p in t["compact"]}))),
               f"{t['full']['shards']} -> {sum(p['shards'] for p in t['compact'])}",
               fmt_bytes(t["full"]["total"]), fmt_bytes(sum(p["total"] for p in t["compact"])), f"{t['saving_pct']:.1f}%"]
              for t in rep["tables"]]
    shards = sorted(rep["shards"]["compact"], key=lambda s: -(s["full_total"] or s["total"]))
    shown = shards if max_shards is None else shards[:max_shards]
    shard_rows = [[s["table"], str(s["rank"]), f"{s['rows']:,} x {s['cols']}", fmt_bytes(s["weight"]), fmt_bytes(s["optimizer"]),
                   fmt_bytes(s["planner_hbm"] if tier == "HBM" else s["planner_ddr"]), fmt_bytes(s["full_total"]),
                   fmt_bytes(s["saving"])] for s in shown]
    yes = {True: "yes", False: "NO"}
    ranks = [[str(r["rank"]), fmt_bytes(r["full"]["total"]), fmt_bytes(r["compact"]["total"]), fmt_bytes(r["cap"]),
              fmt_bytes(r["bytes_full"]), fmt_bytes(r["headroom_full"]), yes[r["fits_full"]],
              fmt_bytes(r["bytes_compact"]), fmt_bytes(r["headroom_compact"]), yes[r["fits_compact"]],
              fmt_bytes(r["saving"]), f"{r['saving_pct']:.1f}%"] for r in rep["ranks"]]
    t = rep["totals"]
    totals = [["raw weights + optimizer", fmt_bytes(t["full"]["total"]), fmt_bytes(t["compact"]["total"]),
               f"{fmt_bytes(t['saving'])} ({t['saving_pct']:.1f}%)"],
              ["  of which weights", fmt_bytes(t["full"]["weight"]), fmt_bytes(t["compact"]["weight"]), ""],
              ["  of which optimizer state", fmt_bytes(t["full"]["optimizer"]), fmt_bytes(t["compact"]["optimizer"]), ""],
              [f"planner estimate ({tier})", fmt_bytes(t["full"][f"planner_{tier.lower()}"]),
               fmt_bytes(t["compact"][f"planner_{tier.lower()}"]), ""],
              ["largest rank (raw)", fmt_bytes(t["max_rank_full"]), fmt_bytes(t["max_rank_compact"]), ""],
              ["imbalance max/mean (raw)", f"{t['imbalance_full']:.2f}", f"{t['imbalance_compact']:.2f}", ""],
              ["imbalance max/mean (planner)", f"{t['planner_imbalance_full']:.2f}", f"{t['planner_imbalance_compact']:.2f}", ""]]
    sv = t["serving"]
    exact = [(d, [sv[side][d] for side in ("full", "compact")]) for d in SERVING_DTYPES]  # to the byte, as the export
    totals += [[f"serving tables {d} (row alignment {sv['row_alignment']})"] + ["-" if n is None else f"{n:,} B" for n in ns]
               + [""] for d, ns in exact]
    if "per_table" in sv["compact"]:
        totals += [[f"serving tables, per-table dtypes (row alignment {sv['row_alignment']})", "-",
                    f"{sv['compact']['per_table']:,} B", ""]]
    more = "" if len(shown) == len(shards) else f" (largest {len(shown)} of {len(shards)}; all in report.json / report.md)"
    return [
        ("Per table", [["table", "rows", "dim", "dim after", "sharding", "kernel", "shards", "bytes before", "bytes after", "saving"]] + tables),
        (f"Per shard of the compact plan{more}", [["table", "rank", "rows x cols", "weights", "optimizer",
                                                        f"planner {tier}", "same shard, full", "saving"]] + shard_rows),
        (f"Per rank (raw = weights + optimizer state; cap = {tier} the planner may fill; headroom = cap - planner {tier})",
         [["rank", "raw before", "raw after", "cap", f"planner {tier} before", "headroom before", "fits before",
           f"planner {tier} after", "headroom after", "fits after", "saving", "saving %"]] + ranks),
        ("Totals", [["", "full", "compact", "saving"]] + totals),
    ]


def _headline(rep: Dict[str, Any]) -> str:
    topo, t = rep["topology"], rep["totals"]
    return (f"{topo['world_size']} ranks ({topo['compute_device']}, {fmt_bytes(topo['capacity_per_rank'])} {topo['tier'].upper()} "
            f"each), optimizer {topo['optimizer']}: {fmt_bytes(t['full']['total'])} -> {fmt_bytes(t['compact']['total'])} "
            f"raw, saving {fmt_bytes(t['saving'])} ({t['saving_pct']:.1f}%); largest rank {fmt_bytes(t['max_rank_full'])} -> "
            f"{fmt_bytes(t['max_rank_compact'])}")


def _fit_lines(rep: Dict[str, Any]) -> List[str]:
    """The full and the compact tables' fit lines (a side planned at its smallest cap says so)."""
    return [rep["fit"][side]["line"] for side in ("full", "compact")]


def render_console(rep: Dict[str, Any]) -> str:
    """Plain-text report for the terminal (largest shards only)."""
    out = [_headline(rep)] + _fit_lines(rep)
    for title, grid in _sections(rep, CONSOLE_SHARDS):
        widths = [max(len(r[i]) for r in grid) for i in range(len(grid[0]))]
        out += ["", title]
        out += ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in grid]
    return "\n".join(out) + "\n"


def render_markdown(rep: Dict[str, Any], source: str = "") -> str:
    """Markdown report (every shard, in a collapsible section).

    Args:
        rep (Dict[str, Any]): `memory_report`'s result.
        source (str): a line saying where the tables came from.

    Example::

        Path("memory.md").write_text(render_markdown(memory_report(tables, compact, PlanConfig())))
    """
    out = ["# Memory report: full vs compact tables", "", _headline(rep) + ".", ""]
    out += [f"- {line}." for line in _fit_lines(rep)] + [""]
    if source:
        out += [source, ""]
    for title, grid in _sections(rep, None):
        body = ["| " + " | ".join(grid[0]) + " |", "|" + "---|" * len(grid[0])] + ["| " + " | ".join(r) + " |" for r in grid[1:]]
        if title.startswith("Per shard"):
            out += [f"<details><summary>{title} ({len(grid) - 1} shards)</summary>", ""] + body + ["", "</details>", ""]
        else:
            out += [f"## {title}", ""] + body + [""]
    return "\n".join(out)


def render_rank_table(rep: Dict[str, Any], source: str = "") -> str:
    """Markdown: the headline, the fit lines, `source` (where the dims came from) and the per-rank table (cap, bytes, headroom)."""
    title, grid = next(s for s in _sections(rep, 0) if s[0].startswith("Per rank"))
    out = [_headline(rep) + ".", ""] + [f"- {line}." for line in _fit_lines(rep)] + [""]
    if source:
        out += [source, ""]
    out += [f"{title}:", "", "| " + " | ".join(grid[0]) + " |", "|" + "---|" * len(grid[0])]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in grid[1:]]) + "\n"


def render_png(rep: Dict[str, Any], path: Union[str, Path]) -> None:
    """Per-rank bars, full vs compact raw bytes, with the planner's estimate marked; written atomically."""
    plt = pyplot()

    tier = rep["topology"]["tier"]
    ranks = [r["rank"] for r in rep["ranks"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(ranks) + 3), 4))
    w = 0.4
    for k, (side, color, mark) in enumerate((("full", "silver", "black"), ("compact", "tab:blue", "navy"))):
        xs = [r + (k - 0.5) * w for r in ranks]
        ax.bar(xs, [r[side]["total"] / GiB for r in rep["ranks"]], w, color=color, label=f"{side}: weights + optimizer")
        ax.scatter(xs, [r[side][f"planner_{tier}"] / GiB for r in rep["ranks"]], marker="_", s=80, color=mark,
                   label=f"{side}: planner estimate", zorder=3)
    ax.axhline(rep["topology"]["cap_per_rank"] / GiB, color="tab:red", linestyle="--", label="cap (planner may fill)")
    t = rep["totals"]
    ax.set_title(f"{len(ranks)} ranks, {fmt_bytes(rep['topology']['capacity_per_rank'])} {tier.upper()} each: "
                 f"saving {fmt_bytes(t['saving'])} ({t['saving_pct']:.1f}%)", fontsize=10)
    ax.set_xlabel("rank")
    ax.set_ylabel("GiB per rank")
    ax.legend(fontsize=8)
    save_png(fig, path)
