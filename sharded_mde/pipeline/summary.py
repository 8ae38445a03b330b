"""The run summary: one table a newcomer can read, as markdown and JSON, plus an AUC-vs-bytes plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from sharded_mde.config import CAPS, RunConfig
from sharded_mde.data.synth import load_ground_truth
from sharded_mde.io import atomic_write_json, atomic_write_text
from sharded_mde.pipeline.ledger import StageLedger
from sharded_mde.plan.report import fmt_bytes
from sharded_mde.plots import pyplot, save_png


def _out(ledger: StageLedger, stage: str) -> Dict[str, Any]:
    return ledger.stages[stage]["outputs"]


def summarise(cfg: RunConfig, ledger: StageLedger) -> Dict[str, Any]:
    """The figures of a finished run, gathered from every stage's recorded outputs."""
    base, search, plan = _out(ledger, "baseline"), _out(ledger, "search"), _out(ledger, "plan")
    retrain, serve = _out(ledger, "retrain"), _out(ledger, "serve_check")
    seconds = {name: st.get("seconds", 0.0) for name, st in ledger.stages.items()}
    totals = plan["totals"]
    groups = " + projections + remap" if search["method"] == "pme" else ""  # PME's bytes count them too
    doc = {
        "run_dir": cfg.run_dir,
        "method": search["method"],
        "budget_fraction": cfg.search.budget if cfg.search.budget != CAPS else search["budget_bytes"] / search["full_bytes"],
        "models": [
            {"model": "full-dimension baseline (tables + optimizer state)", "auc": base["test"]["auc"], "logloss": base["test"]["logloss"],
             "embedding_bytes": search["full_bytes"]},
            {"model": f"compact, {search['method']} + retrain (tables + optimizer state{groups})", "auc": retrain["test"]["auc"],
             "logloss": retrain["test"]["logloss"], "embedding_bytes": search["kept_bytes"]},
            {"model": f"served from the export ({serve['dtype']} tables{groups})", "auc": serve["auc"], "logloss": serve["logloss"],
             "embedding_bytes": serve["serving_table_bytes"]},
        ],
        "dims": search["dims"],
        "serving": _serving(search, retrain, serve),
        "front": retrain.get("front"),
        "token_sizes": search.get("token_sizes"),
        "planted": search.get("planted"),
        "memory": totals,
        "topology": f"{cfg.plan.world_size} x {cfg.plan.compute_device}",
        "serving_examples_per_s": serve["examples_per_s"],
        "search_seconds": seconds.get("search", 0.0),
        "total_seconds": sum(seconds.values()),
        "stage_seconds": seconds,
        "plots": {"search": str(Path(cfg.run_dir) / search["method"] / "search.png"), "memory": plan["png"],
                  "auc_vs_bytes": str(Path(cfg.run_dir) / "auc_vs_bytes.png")},
    }
    truth = load_ground_truth(Path(cfg.data.dir) / "ground_truth.json")
    if truth:  # planted data: the teacher's own test AUC is the ceiling to compare with
        t = truth["teacher"]
        doc["models"].insert(0, {"model": "teacher (planted ground truth)", "auc": t["test_auc"],
                                 "logloss": t["test_logloss"], "embedding_bytes": None})
    return doc


def _serving(search: Dict[str, Any], retrain: Dict[str, Any], serve: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Serving-byte methods: the budget in serving bytes, what the search kept and the export's tables hold (to
    the byte), and the test AUC of the search's final evaluation (retrain, scored as served) and of the export."""
    if "serving" not in search:
        return None
    s = search["serving"]
    return {"full_bytes": s["full_bytes"], "budget_bytes": s["budget_bytes"], "kept_bytes": s["kept_bytes"],
            "export_table_bytes": sum(serve["serving_bytes_by_table"].values()), "row_alignment": s["row_alignment"],
            "retrain_auc": retrain["test"]["auc"], "served_auc": serve["auc"]}


def render_summary(doc: Dict[str, Any]) -> str:
    """Markdown: models (AUC, log loss, embedding bytes), memory on the topology, time."""
    unit = "fp32 serving bytes of the full tables" if doc.get("serving") else "full embedding bytes (weights + optimizer state)"
    lines: List[str] = [f"# sharded_mde run: {doc['run_dir']}", "",
                        f"Search: **{doc['method']}** at a budget of {doc['budget_fraction']:.2%} of the {unit}.", "",
                        "| model | test AUC | test logloss | embedding bytes |", "|---|---:|---:|---:|"]
    for m in doc["models"]:
        lines.append(f"| {m['model']} | {m['auc']:.4f} | {m['logloss']:.4f} | {fmt_bytes(m['embedding_bytes'])} |")
    sv = doc.get("serving")
    if sv:
        lines += ["", f"Serving bytes of the tables (row alignment {sv['row_alignment']}): budget {sv['budget_bytes']:,} B of "
                  f"{sv['full_bytes']:,} B; the search kept {sv['kept_bytes']:,} B; the export's tables hold "
                  f"{sv['export_table_bytes']:,} B. Test AUC: the search's final evaluation (retrain, as served) "
                  f"{sv['retrain_auc']:.6f}, the export (serve-check) {sv['served_auc']:.6f} "
                  f"(difference {sv['served_auc'] - sv['retrain_auc']:+.2e})."]
    t = doc["memory"]
    lines += ["", f"Memory on the planned topology ({doc['topology']}), from the sharding plans:", "",
              "| | full | compact | saving |", "|---|---:|---:|---:|"]
    lines.append(f"| total (raw weights + optimizer) | {fmt_bytes(t['full']['total'])} | {fmt_bytes(t['compact']['total'])} | "
                 f"{t['saving_pct']:.1f}% |")
    lines.append(f"| largest rank | {fmt_bytes(t['max_rank_full'])} | {fmt_bytes(t['max_rank_compact'])} | |")
    lines.append(f"| imbalance (max/mean rank) | {t['imbalance_full']:.2f} | {t['imbalance_compact']:.2f} | |")
    if doc.get("token_sizes"):
        sizes = "; ".join(f"{f} " + " ".join(f"{s}:{n}" for s, n in sorted(v.items(), key=lambda kv: -int(kv[0])))
                          for f, v in doc["token_sizes"].items())
        lines += ["", f"Tokens per size (size:tokens) per field: {sizes}"]
    else:
        kept = ", ".join(f"{k.removeprefix('t_')}:{v}" for k, v in doc["dims"].items())
        lines += ["", f"Kept dims per table: {kept}"]
    planted = doc.get("planted") or {}
    if "spearman" in planted:
        lines.append(f"Spearman correlation of kept dims with the planted ranks: {planted['spearman']:.3f}")
    if "spearman_capacity_mean" in planted:
        lines.append("Spearman correlation of token size with planted capacity (mean over fields): "
                     f"{planted['spearman_capacity_mean']:.3f}")
    lines += _front_lines(doc.get("front"))
    lines += ["", f"Search {doc['search_seconds']:.0f} s, whole run {doc['total_seconds']:.0f} s; serving "
              f"{doc['serving_examples_per_s']:,.0f} examples/s.", "",
              "Plots: " + ", ".join(f"`{p}`" for p in doc["plots"].values()), ""]
    return "\n".join(lines)


def _front_lines(front: Optional[List[Dict[str, Any]]]) -> List[str]:
    """HAM's front of one search: per budget the masked supernet's validation AUC (preview) and the retrained test AUC."""
    if not front:
        return []
    lines = ["", "HAM front from one search (`search.front`): every point retrained.", "",
             "| budget | kept bytes | preview valid AUC (masked supernet) | retrained test AUC |", "|---|---:|---:|---:|"]
    for p in front:
        if p["feasible"]:
            lines.append(f"| {p['budget']:g} | {fmt_bytes(p['kept_bytes'])} | {p['preview_valid']['auc']:.4f} | "
                         f"{p['test']['auc']:.4f} |")
        else:
            lines.append(f"| {p['budget']:g} | not feasible: {p['reason']} | | |")
    return lines


def plot_auc_vs_bytes(doc: Dict[str, Any], path: str | Path) -> None:
    """Test AUC against embedding bytes for the baseline, the compact model and the served export."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for m in [m for m in doc["models"] if m["embedding_bytes"] is not None]:
        ax.scatter(m["embedding_bytes"] / 2**20, m["auc"], s=40)
        ax.annotate(m["model"], (m["embedding_bytes"] / 2**20, m["auc"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    front = [p for p in doc.get("front") or [] if p["feasible"]]
    if front:  # the front's retrained points beside the full baseline and the run's own compact model
        front.sort(key=lambda p: p["kept_bytes"])
        ax.plot([p["kept_bytes"] / 2**20 for p in front], [p["test"]["auc"] for p in front], "o--", color="#2ca02c",
                label="HAM front, retrained")
        ax.legend(fontsize=8)
    ax.set_xlabel("embedding bytes (MiB)")
    ax.set_ylabel("test AUC")
    ax.set_title("AUC vs bytes")
    ax.grid(alpha=0.3)
    save_png(fig, path)


def write_summary(cfg: RunConfig, ledger: StageLedger) -> Dict[str, Any]:
    """Writes summary.md, summary.json and the AUC-vs-bytes plot; prints the markdown."""
    doc = summarise(cfg, ledger)
    root = Path(cfg.run_dir)
    plot_auc_vs_bytes(doc, doc["plots"]["auc_vs_bytes"])
    text = render_summary(doc)
    atomic_write_text(root / "summary.md", text)
    atomic_write_json(root / "summary.json", doc)
    print(text, flush=True)
    return {"summary": str(root / "summary.md")}
