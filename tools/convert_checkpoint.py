"""Converts a checkpoint of the earlier per-rank format (`rank<R>.pt` + COMPLETE.json) into a DCP checkpoint.

The only reader of that format: every rank file is loaded (`torch.load(weights_only=False)`, so
convert only checkpoints you wrote yourself), each sharded entry (model tables, fused optimizer
state) is assembled from its local shards into the whole tensor, and the result is written with
`train/checkpoint.save_checkpoint` into a scratch directory beside the checkpoint, which then
replaces it. The trainer state (step, history, callback states) is rank 0's; the converted
checkpoint resumes on any world size, every rank taking rank 0's RNG state.

    .venv/bin/python tools/convert_checkpoint.py runs/demo/ham/checkpoints/step_000000120 [...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import torch

from sharded_mde.train.checkpoint import COMPLETE, MODEL, OPTIMIZER, save_checkpoint


def _whole(entries: List[Any], key: str) -> Any:
    """One entry of the state across the rank files: sharded pieces assembled, anything else rank 0's."""
    first = entries[0]
    if not (isinstance(first, dict) and first.get("__sharded__")):
        return first
    out = torch.zeros(first["global_size"], dtype=next((t.dtype for e in entries for _, t in e["shards"]), torch.float32))
    filled = 0
    for e in entries:
        for offsets, t in e["shards"]:
            out[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
            filled += t.numel()
    if filled != out.numel():
        raise ValueError(f"entry {key}: the rank files hold {filled} of its {out.numel()} values")
    return out


def _merge(payloads: List[Dict[str, Any]], section: str) -> Dict[str, Any]:
    """The model state, or the optimizer's per-parameter state, as whole tensors."""
    if section == MODEL:
        return {k: _whole([p[MODEL][k] for p in payloads], k) for k in payloads[0][MODEL]}
    found: Dict[str, Dict[str, List[Any]]] = {}  # a table's state is in its owners' files only
    for p in payloads:
        for param, entries in p[OPTIMIZER]["state"].items():
            for name, value in entries.items():
                found.setdefault(param, {}).setdefault(name, []).append(value)
    return {"state": {k: {n: _whole(v, f"{k}.{n}") for n, v in e.items()} for k, e in found.items()}}


def convert(d: Path) -> None:
    """Rewrites the per-rank checkpoint directory `d` as a DCP checkpoint (crash-safe: the old one stays until done)."""
    info = json.loads((d / COMPLETE).read_text())
    if info.get("format"):
        raise ValueError(f"{d}: already a {info['format']} checkpoint")
    world = int(info["world_size"])
    payloads = [torch.load(d / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in range(world)]
    state = {MODEL: _merge(payloads, MODEL)}
    if OPTIMIZER in payloads[0]:
        state[OPTIMIZER] = _merge(payloads, OPTIMIZER)
    first = payloads[0]
    local = {k: first[k] for k in ("step", "history", "callbacks", "rng") if k in first} or None
    extra = {k: v for k, v in info.items() if k not in ("step", "world_size")}
    scratch = Path(tempfile.mkdtemp(prefix=f".{d.name}.", suffix=".convert", dir=d.parent))
    try:
        new = save_checkpoint(scratch, int(info["step"]), state, extra, local=local)
        old = scratch / "old"
        os.replace(d, old)
        os.replace(new, d)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", type=Path, help="step_* directories of the per-rank format")
    args = p.parse_args(argv)
    for d in args.checkpoints:
        try:
            convert(d)
        except (ValueError, OSError, KeyError) as e:
            print(f"convert_checkpoint: error: {d}: {e}", file=sys.stderr)
            return 2
        print(f"{d}: converted to a DCP checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
