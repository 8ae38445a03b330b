"""The fault audit of issue 16: every OS fault, damaged file, interrupt and config change, run through the CLI.

Each case runs `sharded-mde` as a user would (a subprocess, umask 022, OMP_NUM_THREADS unset) on a
tiny synthetic config and records the command, the exit status and the last line of stderr, and
checks that no traceback is printed and that no data is lost or mixed (results compared with an
uninterrupted reference run). Writes the table between the audit markers of docs/reliability.md
and exits non-zero if any case fails. Needs root on Linux for the tmpfs mounts (read-only and full
file systems) and to drop to `nobody` for the permission case.

    .venv/bin/python tools/reliability_audit.py [--scratch DIR] [--doc docs/reliability.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- reliability_audit:start -->", "<!-- reliability_audit:end -->"
STAGES = ["data", "baseline", "search", "plan", "retrain", "export", "serve_check", "summary"]


class Audit:
    """Runs the CLI in a scratch directory and collects one table row per case."""

    def __init__(self, scratch: Path) -> None:
        self.s = scratch
        self.rows: List[Dict[str, Any]] = []
        self.config = scratch / "tiny.yaml"
        self.data = scratch / "data"

    # ------------------------------------------------------------------ running the CLI
    def env(self, **extra: str) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        env["PYTHONPATH"] = str(ROOT)
        env.update(extra)
        return env

    def argv(self, args: Sequence[str]) -> List[str]:
        return [sys.executable, "-m", "sharded_mde.cli", *args]

    def cli(self, args: Sequence[str], user: Optional[int] = None, timeout: float = 600) -> subprocess.CompletedProcess:
        cmd = self.argv(args)
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
        return subprocess.run(cmd, cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=timeout)

    def start(self, args: Sequence[str], stderr: Path) -> subprocess.Popen:
        """The CLI in the background, stdout piped (read line by line), stderr to a file (never blocks)."""
        with open(stderr, "w") as err:
            return subprocess.Popen(self.argv(args), cwd=ROOT, env=self.env(), stdout=subprocess.PIPE, stderr=err,
                                    text=True)

    def show(self, args: Sequence[str]) -> str:
        """The command as the table shows it: scratch paths shortened to $S."""
        text = " ".join(["sharded-mde", *args])
        return text.replace(str(self.s), "$S")

    def record(self, case: str, args: Sequence[str], rc: int, stderr: str, expect_rc: int,
               checks: Dict[str, bool], note: str = "", pick: str = "") -> None:
        lines = [ln for ln in stderr.splitlines() if ln.strip() and (not pick or pick in ln)]
        message = lines[-1] if lines and (pick or rc != 0) else ""
        checks = {"exit status": rc == expect_rc, "no traceback": "Traceback" not in stderr, **checks}
        failed = [k for k, ok in checks.items() if not ok]
        self.rows.append({"case": case, "command": self.show(args), "exit": rc, "message": message.replace(str(self.s), "$S"),
                          "checks": ", ".join(k for k in checks if k not in ("exit status", "no traceback")),
                          "failed": failed, "note": note})
        status = "ok" if not failed else f"FAILED {failed}"
        print(f"[audit] {case}: exit {rc} {status}\n        {message[:300]}", flush=True)
        if failed and "Traceback" in stderr:
            print(stderr[-3000:], flush=True)

    def case(self, case: str, args: Sequence[str], expect_rc: int, checks: Callable[[subprocess.CompletedProcess], Dict[str, bool]],
             note: str = "", user: Optional[int] = None, pick: str = "") -> subprocess.CompletedProcess:
        """Runs one command and records it; `pick`: show the last stderr line containing it."""
        p = self.cli(args, user=user)
        self.record(case, args, p.returncode, p.stderr + p.stdout if pick.startswith("[run]") else p.stderr,
                    expect_rc, checks(p), note, pick)
        return p

    # ------------------------------------------------------------------ run directories
    def write_config(self) -> None:
        self.config.write_text(yaml.safe_dump({
            "run_dir": str(self.s / "runs" / "default"),
            "data": {"format": "synth", "dir": str(self.data), "synth_rows": 4000, "synth_num_sparse": 4,
                     "synth_num_dense": 3, "synth_vocab_min": 20, "synth_vocab_max": 300, "synth_seed": 0},
            "model": {"embedding_dim": 8, "dense_arch": [8, 8], "over_arch": [8, 1]},
            "train": {"batch_size": 256, "epochs": 1, "checkpoint_every": 3, "sharding": "table_wise", "progress": False},
            "search": {"method": "ham", "budget": 0.6, "epochs": 1},
            "plan": {"world_size": 2, "compute_device": "cpu", "batch_size": 256},
            "export": {"serve_batch_size": 256},
        }))

    def run_args(self, run: Path, *extra: str) -> List[str]:
        return ["run", str(self.config), "--set", f"run_dir={run}", *extra]

    def copy_of(self, name: str) -> Path:
        """A copy of the reference run directory (its export's data path stays the reference data)."""
        dst = self.s / "runs" / name
        shutil.copytree(self.s / "runs" / "reference", dst, symlinks=True)
        return dst


def result(run: Path) -> Dict[str, Any]:
    """What must not depend on faults and restarts: the dims and every model's test metrics."""
    summary = json.loads((run / "summary.json").read_text())
    return {"dims": summary["dims"], "models": [(m["model"], round(m["auc"], 6), round(m["logloss"], 6))
                                                for m in summary["models"]]}


def ledger(run: Path) -> Dict[str, Any]:
    p = run / "stages.json"
    return json.loads(p.read_text())["stages"] if p.is_file() else {}


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False) -> Iterator[Path]:
    """A small tmpfs at `path` (read-only, or of `size`), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def modes(root: Path) -> Dict[str, set]:
    """Octal modes of the files and directories under `root` (and `root` itself)."""
    out: Dict[str, set] = {"files": set(), "dirs": {oct(stat.S_IMODE(root.stat().st_mode))}}
    for p in root.rglob("*"):
        out["dirs" if p.is_dir() else "files"].add(oct(stat.S_IMODE(p.stat().st_mode)))
    return out


def interrupt_each_stage(a: Audit, ref: Dict[str, Any]) -> None:
    """Ctrl-C (SIGINT) in every stage in turn, one rerun per stage, SIGTERM once; a second writer refused."""
    run = a.s / "runs" / "interrupted"
    data = a.s / "data_interrupted"
    extra = ["--set", f"data.dir={data}"]
    for i, stage in enumerate(STAGES):
        args = a.run_args(run, *extra)
        err_file = a.s / f"interrupt_{stage}.err"
        proc = a.start(args, err_file)
        assert proc.stdout is not None
        seen = False
        for line in proc.stdout:
            if line.startswith(f"[run] {stage} ..."):
                seen = True
                break
        if not seen:
            proc.communicate()
            err = err_file.read_text()
            a.record(f"Ctrl-C in stage {stage}", args, proc.returncode, err, 130, {"stage started": False})
            continue
        if stage == "baseline":  # a second writer while this one holds the run directory (paused meanwhile)
            proc.send_signal(signal.SIGSTOP)
            second = a.run_args(run, *extra, "--set", "train.seed=7")
            before = ledger(run)
            a.case("two concurrent runs in one run_dir (the second with another seed)", second, 2,
                   lambda p: {"names the holder's pid": f"pid {proc.pid}" in p.stderr, "ledger untouched": ledger(run) == before})
            proc.send_signal(signal.SIGCONT)
        if stage != "export":  # export of the tiny run takes less than this: the signal would land in serve_check
            time.sleep(0.05)  # let the stage get going (some stages of the tiny run take well under a second)
        sig = signal.SIGTERM if stage == "retrain" else signal.SIGINT
        proc.send_signal(sig)
        proc.communicate(timeout=300)
        err = err_file.read_text()
        done = ledger(run)
        hit = next((s for s in STAGES if s not in done), "none")  # the stage the signal landed in
        a.record(f"{'SIGTERM' if sig == signal.SIGTERM else 'Ctrl-C (SIGINT)'} during stage {hit}", args,
                 proc.returncode, err, 128 + sig, {f"landed in stage {stage}": hit == stage,
                                                   "earlier stages kept": all(s in done for s in STAGES[:i]),
                                                   "no temp file left": not list(run.rglob(".*.tmp"))})
    args = a.run_args(run, *extra)
    a.case("rerun after the interrupts", args, 0,
           lambda p: {"same dims and metrics as the uninterrupted run": result(run) == ref})


def faults(a: Audit, ref: Dict[str, Any]) -> None:
    """Read-only and unwritable run directories, a full disk, damaged marker files."""
    ro = a.s / "ro"
    with tmpfs(ro, "1m", readonly=True):
        args = a.run_args(ro / "run")
        a.case("read-only file system as run_dir", args, 2,
               lambda p: {"no stage started": "[run]" not in p.stdout, "names the path": str(ro) in p.stderr})
    locked = a.s / "runs" / "not_mine"
    locked.mkdir(parents=True)
    os.chmod(locked, 0o755)  # root's directory: `nobody` may not write it
    args = a.run_args(locked)
    a.case("run_dir without write permission (run as nobody)", args, 2,
           lambda p: {"no stage started": "[run]" not in p.stdout, "names the path": str(locked) in p.stderr},
           user=65534)

    full = a.s / "full"
    with tmpfs(full, "320k"):
        run = full / "run"
        args = a.run_args(run)
        a.case("full disk (run_dir on a 320 KiB tmpfs)", args, 2,
               lambda p: {"names the stage": "while running stage" in p.stderr, "no temp file left": not list(run.rglob(".*.tmp"))})
        subprocess.run(["mount", "-o", "remount,size=64m", str(full)], check=True)
        a.case("same run after the disk was enlarged", args, 0,
               lambda p: {"same dims and metrics as the uninterrupted run": result(run) == ref})

    run = a.copy_of("damaged_ledger")
    (run / "stages.json").write_text('{"stages": [1, 2')
    args = a.run_args(run)
    a.case("damaged stages.json", args, 2, lambda p: {"names the file": str(run / "stages.json") in p.stderr})
    (run / "stages.json").unlink()
    a.case("same run after deleting stages.json", args, 0,
           lambda p: {"same dims and metrics": result(run) == ref})

    run = a.copy_of("damaged_marker")
    stages = ledger(run)
    keep = {k: v for k, v in stages.items() if STAGES.index(k) < STAGES.index("retrain")}
    (run / "stages.json").write_text(json.dumps({"stages": keep}))
    newest = sorted((run / "retrain" / "checkpoints").glob("step_*"))[-1]
    (newest / "COMPLETE.json").write_text('{"step": ')
    args = a.run_args(run)
    a.case("damaged checkpoint marker COMPLETE.json (retrain)", args, 2,
           lambda p: {"names the file": str(newest / "COMPLETE.json") in p.stderr})
    shutil.rmtree(newest)
    a.case("same run after deleting that checkpoint", args, 0,
           lambda p: {"same dims and metrics": result(run) == ref})

    run = a.copy_of("damaged_config_record")
    (run / "baseline" / "checkpoints" / "CONFIG.json").write_bytes(b"\xff\xfe")
    (run / "stages.json").write_text(json.dumps({"stages": {}}))
    args = a.run_args(run)
    a.case("damaged checkpoint config record CONFIG.json (baseline)", args, 2,
           lambda p: {"names the file": "CONFIG.json" in p.stderr})


def config_changes(a: Audit, ref: Dict[str, Any], ref_run: Path) -> None:
    """Changed seed and batch size (pipeline and `train`), changed export section, --force."""
    run = a.copy_of("changed_seed")
    args = a.run_args(run, "--set", "train.seed=1")
    a.case("`run` again with a changed train.seed", args, 2,
           lambda p: {"refuses to resume the old checkpoints": "--force" in p.stderr,
                      "no old result reported": not (run / "summary.json").exists() or "[run] summary" not in p.stdout})
    args = a.run_args(run, "--set", "train.seed=1", "--force")
    a.case("the same with --force", args, 0,
           lambda p: {"baseline retrained with seed 1":
                      json.loads((run / "baseline" / "metrics.json").read_text())["train_config"]["seed"] == 1,
                      "new results": result(run) != ref})

    run = a.copy_of("changed_batch")
    args = ["train", str(a.config), "--set", f"run_dir={run}", "--set", "train.batch_size=128"]
    a.case("`train` again with a changed train.batch_size", args, 2,
           lambda p: {"refuses to resume the old checkpoints": "another training config" in p.stderr,
                      "old metrics untouched": json.loads((run / "baseline" / "metrics.json").read_text())
                      ["train_config"]["batch_size"] == 256})

    run = a.copy_of("changed_export")
    args = a.run_args(run, "--set", "export.dtype=fp16")
    a.case("`run` again with a changed export.dtype", args, 0, pick="[run] config changed", checks=
           lambda p: {"reruns export, serve_check, summary only": "running export, serve_check, summary again" in p.stdout
                      and "[run] baseline: done earlier" in p.stdout,
                      "serves fp16": json.loads((run / "summary.json").read_text())["models"][-1]["model"].find("fp16") >= 0})


def data_cases(a: Audit, ref_run: Path) -> None:
    """serve-check on moved and re-prepared data; readers: a non-UTF-8 line, a file of malformed lines."""
    export = ref_run / "export"
    served = ledger(ref_run)["serve_check"]["outputs"]["auc"]
    moved = a.s / "data_moved"
    shutil.copytree(a.data, moved)
    args = ["serve-check", str(a.config), "--export", str(export), "--set", f"data.dir={moved}", "--device", "cpu"]
    a.case("serve-check with the data moved (data.dir set to the new place)", args, 0,
           lambda p: {"same AUC as the run's serve-check": abs(json.loads(p.stdout)["auc"] - served) < 1e-9})
    args = ["serve-check", str(a.config), "--export", str(export), "--set", f"data.dir={a.s / 'nowhere'}"]
    a.case("serve-check with data.dir pointing nowhere", args, 2, lambda p: {"names data.dir": "nowhere" in p.stderr})
    other = a.s / "data_reprepared"
    prep = a.cli(["data", "prepare", str(a.config), "--set", f"data.dir={other}", "--set", "data.synth_seed=1"])
    assert prep.returncode == 0, prep.stderr
    args = ["serve-check", str(a.config), "--export", str(export), "--set", f"data.dir={other}"]
    a.case("serve-check on re-prepared (other) data", args, 2,
           lambda p: {"names both": str(other).replace(str(a.s), "") in p.stderr and str(export) in p.stderr})

    raw = a.s / "raw"
    raw.mkdir()
    good = ["\t".join(["1" if i % 3 else "0", *[str(i % 7)] * 13, *[f"{(i * 7 + j) % 50:08x}" for j in range(26)]])
            for i in range(60)]
    latin = raw / "day_0.tsv"
    not_utf8 = good[0].replace(good[0].split("\t")[14], "café", 1).encode("latin-1")  # é as one byte 0xE9
    latin.write_bytes(b"".join(line.encode() + b"\n" for line in good[:30]) + not_utf8 + b"\n"
                      + b"".join(line.encode() + b"\n" for line in good[30:]))
    sets = ["--set", "data.format=criteo_tsv", "--set", f"data.paths=[{latin}]", "--set", f"data.dir={a.s / 'data_tsv'}"]
    a.case("a line that is not UTF-8 (Latin-1) in a Criteo file", ["data", "prepare", str(a.config), *sets], 0,
           lambda p: {"line 31 skipped and named": f"{latin} line 31: skipped malformed line (bytes that are not UTF-8)"
                      in p.stderr, "the other 60 rows prepared":
                      sum(json.loads((a.s / "data_tsv" / "meta.json").read_text())["rows"].values()) == 60},
           pick="line 31")
    a.case("the same under data.strict", ["data", "prepare", str(a.config), *sets, "--set", "data.strict=true",
                                          "--set", f"data.dir={a.s / 'data_tsv_strict'}"], 2,
           lambda p: {"names the line": f"{latin} line 31: malformed" in p.stderr})
    bad = raw / "day_1.tsv"
    bad.write_text("1\t2\t3\nnot a criteo line\n")
    sets = ["--set", "data.format=criteo_tsv", "--set", f"data.paths=[{latin}, {bad}]",
            "--set", f"data.dir={a.s / 'data_bad'}"]
    a.case("a file whose every line is malformed", ["data", "prepare", str(a.config), *sets], 2,
           lambda p: {"names the file": f"{bad}: no valid row" in p.stderr})


def input_cases(a: Audit, ref_run: Path) -> None:
    """The earlier audit's bad-input cases, again through the CLI; export file modes and a damaged export."""
    args = ["run", str(a.s / "missing.yaml")]
    a.case("missing config file", args, 2, lambda p: {"names the file": "missing.yaml" in p.stderr})
    junk = a.s / "junk.yaml"
    junk.write_bytes(bytes(range(200, 256)) * 3)
    a.case("config of random bytes", ["run", str(junk)], 2, lambda p: {"names the file": "junk.yaml" in p.stderr})
    args = a.run_args(a.s / "runs" / "bad_value", "--set", "train.batch_size=-3")
    a.case("config value out of range", args, 2, lambda p: {"names the key": "batch_size" in p.stderr})

    m = modes(ref_run / "export")
    a.rows.append({"case": "modes of an export's files and directories (umask 022)", "command": "stat -c %a $S/runs/reference/export/**",
                   "exit": 0, "message": f"files {sorted(m['files'])}, directories {sorted(m['dirs'])}", "checks": "644 / 755",
                   "failed": [] if m == {"files": {"0o644"}, "dirs": {"0o755"}} else ["modes"], "note": ""})
    damaged = a.copy_of("damaged_export") / "export"
    table = next(p for p in sorted(damaged.rglob("*")) if p.is_file() and p.parent.name == "tables")
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0xFF
    table.write_bytes(bytes(data))
    args = ["serve-check", str(a.config), "--export", str(damaged)]
    a.case("one byte of an exported table altered", args, 2, lambda p: {"names the file": table.name in p.stderr})


def render(rows: List[Dict[str, Any]], command: str) -> str:
    """The markdown table of the audit."""
    out = [START, "", f"Produced by `{command}` ({time.strftime('%Y-%m-%d', time.gmtime())}); `$S` is its scratch "
           "directory. A case passes when the exit status is the expected one, no traceback is printed, and its "
           "checks hold.", "", "| case | command | exit | message (last line of stderr) | checked | passed |",
           "|---|---|---:|---|---|---|"]
    for r in rows:
        cell = lambda t: str(t).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        out.append(f"| {cell(r['case'])} | `{cell(r['command'])}` | {r['exit']} | {cell(r['message'])} | "
                   f"{cell(r['checks'])} | {'yes' if not r['failed'] else 'NO: ' + ', '.join(r['failed'])} |")
    out += ["", END]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scratch", default="/tmp/sharded_mde_audit")
    p.add_argument("--doc", default=str(ROOT / "docs" / "reliability.md"))
    p.add_argument("--only", default="", help="comma-separated groups: interrupts,faults,config,data,inputs")
    args = p.parse_args()
    os.umask(0o022)
    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    a = Audit(scratch)
    a.write_config()
    reference = scratch / "runs" / "reference"
    ref_proc = a.cli(a.run_args(reference))
    if ref_proc.returncode != 0:
        raise SystemExit(f"reference run failed:\n{ref_proc.stderr[-3000:]}")
    ref = result(reference)
    groups = {"interrupts": lambda: interrupt_each_stage(a, ref), "faults": lambda: faults(a, ref),
              "config": lambda: config_changes(a, ref, reference), "data": lambda: data_cases(a, reference),
              "inputs": lambda: input_cases(a, reference)}
    for name in (args.only.split(",") if args.only else groups):
        groups[name]()
    table = render(a.rows, "python tools/reliability_audit.py")
    doc = Path(args.doc)
    text = doc.read_text()
    if START in text:
        text = text[:text.index(START)] + table + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Fault audit (issue 16)\n\n" + table + "\n"
    if not args.only:
        doc.write_text(text)
    failed = [r["case"] for r in a.rows if r["failed"]]
    print(f"[audit] {len(a.rows)} cases, {len(failed)} failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
