"""What a search leaves in its stage directory: dims.json, trace.json and search.png.

After HAM's candidate check, check.md lists every candidate allocation with its validation
scores and names the winner. The PNG shows the kept dim of every table (with the planted rank when the data is synthetic) and,
for searches with a trace, the kept bytes against the budget, lambda and validation AUC over the
search. With planted data the dims file's `planted` record also scores the result against the
ground truth (Spearman correlation of kept dims with planted ranks, dims of rank-0 fields).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from sharded_mde.io import atomic_write_json, atomic_write_text
from sharded_mde.dims import CandidateCheck, DimsFile, PlantedAgreement, load_dims, save_dims
from sharded_mde.plots import pyplot, save_png


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation with average ranks for ties (nan if either side is constant)."""
    rx, ry = _average_ranks(np.asarray(x, float)), _average_ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _average_ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):
        tie = v == value
        ranks[tie] = ranks[tie].mean()
    return ranks


def planted_agreement(dims: DimsFile, ranks: Mapping[str, int]) -> PlantedAgreement:
    """Kept dims against planted ranks per feature: Spearman, and the dims of fields planted at rank 0."""
    kept = {f: t.dim for t in dims.tables for f in t.features if f in ranks}
    feats = sorted(kept)
    rho = spearman(np.array([kept[f] for f in feats]), np.array([ranks[f] for f in feats]))
    rank0 = {f: kept[f] for f in feats if ranks[f] == 0}
    return PlantedAgreement(spearman=rho, fields=len(feats), rank0_dims=rank0,
                            rank0_at_most_4=all(d <= 4 for d in rank0.values()),
                            dims_vs_ranks={f: [kept[f], int(ranks[f])] for f in feats})


def check_markdown(check: CandidateCheck) -> str:
    """The candidate check of a search as markdown: every candidate's validation scores and bytes, and the winner."""
    lines = ["| candidate | valid AUC | valid logloss | kept bytes | dims |", "|---|---|---|---|---|"]
    for r in check.candidates:
        name = f"**{r.name}**" if r.name == check.winner else r.name
        lines.append(f"| {name} | {r.valid_auc:.4f} | {r.valid_logloss:.4f} | {r.kept_bytes:,} | "
                     f"{' '.join(str(d) for d in r.dims.values())} |")
    runner = check.runner_up
    margin = (f", {check.margin_vs_runner_up:+.4f} validation AUC over the runner-up {runner}" if runner else "")
    lines += ["", f"Winner: {check.winner}{margin}; {check.margin_vs_ham:+.4f} over HAM's own allocation. "
              f"Rule: {check.rule or 'best validation AUC'}."]
    return "\n".join(lines) + "\n"


def save_search_result(out_dir: str | Path, dims: DimsFile, trace: Optional[Dict[str, Any]] = None,
                       ranks: Optional[Mapping[str, int]] = None) -> Path:
    """Writes dims.json (with the planted score when `ranks` is known), trace.json, search.png and,
    after a candidate check, check.md; returns dims.json."""
    out = Path(out_dir)
    if ranks:
        dims.planted = planted_agreement(dims, ranks)
    if trace is not None:
        atomic_write_json(out / "trace.json", trace)
        dims.trace_file = "trace.json"
    save_dims(out / "dims.json", dims)
    if dims.check is not None:
        atomic_write_text(out / "check.md", check_markdown(dims.check))
    plot_search(out / "search.png", dims, trace, ranks)
    return out / "dims.json"


def plot_search(path: str | Path, dims: DimsFile, trace: Optional[Dict[str, Any]] = None,
                ranks: Optional[Mapping[str, int]] = None) -> None:
    """PNG: kept dim per table (planted rank as markers) and, with a trace, the budget over the search."""
    plt = pyplot()

    panels = 2 if trace and trace.get("steps") else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(8, 0.38 * len(dims.tables) + 3), 4 * panels), squeeze=False)
    ax = axes[0][0]
    x = np.arange(len(dims.tables))
    ax.bar(x, [t.full_dim for t in dims.tables], color="#dddddd", label="full dim")
    ax.bar(x, [t.dim for t in dims.tables], color="#3b75af", label="kept dim")
    if ranks:
        r = [ranks.get(t.features[0], np.nan) for t in dims.tables]
        ax.scatter(x, r, color="#d62728", marker="_", s=160, linewidths=2.5, zorder=3, label="planted rank")
    ax.set_xticks(x, [t.features[0] for t in dims.tables], rotation=90, fontsize=8)
    ax.set_ylabel("columns")
    title = (f"{dims.method}: kept {dims.kept_bytes / 2**20:,.1f} MiB of {dims.full_bytes / 2**20:,.1f} MiB "
             f"(budget {dims.budget_fraction:.0%} = {dims.budget_bytes / 2**20:,.1f} MiB)")
    if dims.planted:
        title += f"; Spearman vs planted rank {dims.planted.spearman:.2f}"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    if panels == 2:
        _plot_trace(axes[1][0], trace)
    save_png(fig, path)


def _plot_trace(ax: Any, trace: Dict[str, Any]) -> None:
    """Kept bytes / full bytes and the budget over steps; lambda on a second axis; validation AUC marked."""
    full = trace["full_bytes"]
    steps = [s["step"] for s in trace["steps"]]
    ax.plot(steps, [s["kept_bytes"] / full for s in trace["steps"]], color="#3b75af", label="kept bytes / full")
    if trace.get("walk"):  # a front: the target walking down through its budgets
        ax.plot(steps, [s["target"] / full for s in trace["steps"]], color="#2ca02c", linestyle="--", label="target")
    else:
        ax.axhline(trace["budget_bytes"] / full, color="#2ca02c", linestyle="--", label="budget")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of full bytes")
    lam = ax.twinx()
    lam.plot(steps, [s["lambda"] for s in trace["steps"]], color="#ff7f0e", alpha=0.7, label="lambda")
    lam.set_ylabel("lambda")
    for e in trace.get("evals", []):
        if e.get("auc") is not None:
            ax.annotate(f"AUC {e['auc']:.4f}", (e["step"], e["kept_bytes"] / full), fontsize=7,
                        xytext=(0, 8), textcoords="offset points", ha="center")
    lines = ax.get_legend_handles_labels()
    more = lam.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper right")
    ax.set_title("budget over the search", fontsize=10)


def checks_summary(root: str | Path) -> str:
    """Markdown over every HAM dims file under `root` (e.g. a bench_quality directory): per budget,
    each candidate's mean validation AUC over the runs, and how often it won the check."""
    by_budget: Dict[float, List[CandidateCheck]] = {}
    for path in sorted(Path(root).rglob("dims.json")):
        dims = load_dims(path)
        if dims.method == "ham" and dims.check is not None:
            by_budget.setdefault(dims.budget_fraction, []).append(dims.check)
    lines = ["| budget | runs | candidate | mean valid AUC | mean vs ham | wins |", "|---|---|---|---|---|---|"]
    for budget, checks in sorted(by_budget.items()):
        names = [r.name for r in checks[0].candidates]
        for name in names:
            aucs = [c.candidate(name).valid_auc for c in checks]
            own = [c.candidate("ham").valid_auc for c in checks]
            wins = sum(c.winner == name for c in checks)
            lines.append(f"| {budget:g} | {len(checks)} | {name} | {np.mean(aucs):.4f} | "
                         f"{np.mean(np.subtract(aucs, own)):+.4f} | {wins} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m sharded_mde.search.report DIR  (HAM candidate checks of every dims.json under DIR)")
    print(checks_summary(sys.argv[1]), end="")
