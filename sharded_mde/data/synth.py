"""Planted synthetic click data: a teacher whose field f carries a known intrinsic rank r_f.

Criteo-shaped by default (13 dense, 26 categorical fields, vocabularies log-spaced from 100 to
200,000, Zipf-distributed tokens). Token v of field f has a latent u_fv in R^{r_f}; the label
comes from a random one-hidden-layer teacher on the sum of the projected latents, so a field of
rank r needs r embedding columns and rank-0 fields are pure noise. The design is documented in
docs/synthetic_data.md. Written in chunks (Criteo TSV or canonical Parquet), deterministic by
seed, with the ground truth (ranks, vocab sizes, teacher test AUC) as JSON.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from sharded_mde.config import DataConfig
from sharded_mde.data.encode import transform_dense
from sharded_mde.data.readers import LABEL, Schema
from sharded_mde.data.splits import assign_splits
from sharded_mde.io import atomic_path, atomic_write_json

HIDDEN = int(__import__("os").environ.get("HID", "48"))  # teacher hidden width k (>= the largest default rank, 32)
LINEAR_WEIGHT = float(__import__("os").environ.get("LW", "0.25"))  # weight of the optional linear term w . z relative to c . relu(z)
DENSE_WEIGHT = 1.0  # dense features carry this many fields' worth of hidden variance
TARGET_LOGIT_STD = float(__import__("os").environ.get("LSTD", "1.2"))  # logit spread, tuned so the teacher's test AUC is about 0.78
TARGET_CTR = 0.25
SIGNAL_P_REF = float(__import__("os").environ.get("SPREF", "1e-3"))  # rarer tokens: latent scale sqrt(p / SIGNAL_P_REF)
HEAD_MASS = 0.8  # the head of a field: its most popular tokens carrying this share of traffic
CHUNK_ROWS = 1 << 17
CALIBRATION_ROWS = 50_000
SYNTH_VERSION = 1
# Default planted ranks for 26 fields (permuted over fields by the seed): 6 noise fields, most <= 16.
DEFAULT_RANK_PROFILE = (0, 0, 0, 0, 0, 0, 2, 2, 3, 4, 4, 5, 6, 6, 8, 8, 8, 10, 12, 12, 14, 16, 16, 16, 24, 32)


@dataclass(frozen=True)
class SynthSpec:
    """Everything that determines the generated data (a DataConfig's synth_* fields)."""

    rows: int = 200_000
    seed: int = 0
    num_dense: int = 13
    num_sparse: int = 26
    vocab_min: int = 100
    vocab_max: int = 200_000
    zipf: float = 1.1
    ranks: Tuple[int, ...] = ()
    tail_capacity: bool = False

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "SynthSpec":
        """The generator settings of a data config."""
        return cls(cfg.synth_rows, cfg.synth_seed, cfg.synth_num_dense, cfg.synth_num_sparse, cfg.synth_vocab_min,
                   cfg.synth_vocab_max, cfg.synth_zipf, tuple(cfg.synth_ranks), cfg.synth_tail_capacity)

    def validate(self) -> None:
        """Rejects settings the generator cannot honour, naming the config key."""
        if self.rows < 1 or self.num_sparse < 1 or self.num_dense < 0:
            raise ValueError("synth_rows and synth_num_sparse must be >= 1, synth_num_dense >= 0")
        if not 1 <= self.vocab_min <= self.vocab_max:
            raise ValueError(f"synth_vocab_min/max: need 1 <= min <= max, got {self.vocab_min}, {self.vocab_max}")
        if self.zipf <= 0:
            raise ValueError(f"synth_zipf: must be > 0, got {self.zipf}")
        if self.ranks and (len(self.ranks) != self.num_sparse or min(self.ranks) < 0 or max(self.ranks) > HIDDEN):
            raise ValueError(f"synth_ranks: need {self.num_sparse} ranks in [0, {HIDDEN}], got {list(self.ranks)}")

    def schema(self) -> Schema:
        """Criteo-style field names: I1.. dense, C1.. sparse."""
        return Schema(tuple(f"I{i + 1}" for i in range(self.num_dense)),
                      tuple(f"C{i + 1}" for i in range(self.num_sparse)))

    def fingerprint(self) -> str:
        """A digest of the settings and the generator version."""
        blob = json.dumps({"version": SYNTH_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_ranks(num_sparse: int, seed: int) -> List[int]:
    """The default rank profile resampled to `num_sparse` fields, assigned by a seeded permutation."""
    profile = np.array(DEFAULT_RANK_PROFILE)
    picked = profile[np.round(np.linspace(0, len(profile) - 1, num_sparse)).astype(int)]
    return [int(r) for r in np.random.default_rng([seed, 7]).permutation(picked)]


def _fmix32(x: np.ndarray) -> np.ndarray:
    """Murmur3's 32-bit finaliser: a bijection on uint32, so distinct tokens get distinct values."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> np.uint32(16)
    return x


def _hex8(x: np.ndarray) -> pa.Array:
    """uint32 values as 8-character lowercase hex strings (Criteo's categorical format)."""
    return pa.array(np.frombuffer(x.astype(">u4").tobytes().hex().encode(), dtype="S8")).cast(pa.string())


class Teacher:
    """The planted model: token latents, random maps, and the calibrated logit."""

    def __init__(self, spec: SynthSpec) -> None:
        spec.validate()
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        n_f, n_d = spec.num_sparse, spec.num_dense
        self.ranks = list(spec.ranks) if spec.ranks else default_ranks(n_f, spec.seed)
        self.vocab_sizes = [int(v) for v in np.round(np.geomspace(spec.vocab_min, spec.vocab_max, n_f))]
        self.missing = np.where(rng.random(n_f) < 1 / 3, rng.uniform(0.02, 0.4, n_f), 0.0)
        self.value_keys = rng.integers(0, 1 << 32, n_f, dtype=np.uint64).astype(np.uint32)
        self.cdf, self.head_sizes, self.capacity, self.latents, self.maps = [], [], [], [], []
        for f in range(n_f):
            v, r = self.vocab_sizes[f], self.ranks[f]
            p = np.arange(1, v + 1, dtype=np.float64) ** -spec.zipf
            cdf = np.cumsum(p / p.sum())
            cdf[-1] = 1.0
            head = int(np.searchsorted(cdf, HEAD_MASS) + 1) if spec.tail_capacity else v
            tail_cap = max(1, r // 4) if r > 0 else 0
            cap = np.full(v, r, dtype=np.int16)
            cap[head:] = tail_cap
            u = rng.normal(0.0, np.sqrt(1.0 / max(r, 1)), (v, r))
            u *= np.sqrt(np.minimum(1.0, np.diff(cdf, prepend=0.0) / SIGNAL_P_REF))[:, None]
            if head < v and r > 0:  # tail tokens: the same total variance on fewer coordinates
                u[head:, tail_cap:] = 0.0
                u[head:, :tail_cap] *= np.sqrt(r / tail_cap)
            self.cdf.append(cdf)
            self.head_sizes.append(head)
            self.capacity.append(cap)
            self.latents.append(u.astype(np.float32))
            self.maps.append(rng.normal(0.0, 1.0, (r, HIDDEN)).astype(np.float32))
        self.dense_mu = rng.uniform(0.5, 3.5, n_d)
        self.dense_sigma = rng.uniform(0.5, 1.5, n_d)
        self.dense_missing = np.where(rng.random(n_d) < 0.5, rng.uniform(0.0, 0.45, n_d), 0.0)
        self.dense_map = (rng.normal(0.0, 1.0, (n_d, HIDDEN)) * DENSE_WEIGHT / np.sqrt(max(n_d, 1))).astype(np.float32)
        self.c = rng.normal(0.0, 1.0, HIDDEN).astype(np.float32)
        self.w = (rng.normal(0.0, 1.0, HIDDEN) * LINEAR_WEIGHT).astype(np.float32)
        self.dense_mean = np.zeros(n_d)
        self.dense_std = np.ones(n_d)
        self.scale, self.bias = 1.0, 0.0
        self._calibrate(np.random.default_rng([spec.seed, 1]))

    def _calibrate(self, rng: np.random.Generator) -> None:
        """Standardises the dense inputs and sets scale and bias for the target logit spread and CTR."""
        tokens, dense = self._draw_inputs(rng, CALIBRATION_ROWS)
        processed = transform_dense(dense)
        self.dense_mean = processed.mean(axis=0)
        self.dense_std = np.maximum(processed.std(axis=0), 1e-6)
        score = self._score(tokens, dense)
        self.scale = TARGET_LOGIT_STD / max(float(score.std()), 1e-12)
        z = self.scale * (score - score.mean())
        lo, hi = -20.0, 20.0
        for _ in range(60):  # bisection: mean sigmoid(b + z) = TARGET_CTR
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.mean(1 / (1 + np.exp(-(mid + z)))) < TARGET_CTR else (lo, mid)
        self.bias = (lo + hi) / 2 - self.scale * float(score.mean())

    def value_strings(self, f: int) -> pa.Array:
        """The raw (hex) value of every token of field f, indexed by popularity rank."""
        return _hex8(_fmix32(np.arange(self.vocab_sizes[f], dtype=np.uint32) ^ self.value_keys[f]))

    def _draw_inputs(self, rng: np.random.Generator, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """Tokens [n, F] (popularity rank, -1 = missing) and raw dense values [n, D] (NaN = empty)."""
        tokens = np.empty((n, self.spec.num_sparse), dtype=np.int64)
        for f, cdf in enumerate(self.cdf):
            tokens[:, f] = np.searchsorted(cdf, rng.random(n), side="right")
            tokens[rng.random(n) < self.missing[f], f] = -1
        log_x = self.dense_mu + self.dense_sigma * rng.standard_normal((n, self.spec.num_dense))
        dense = np.floor(np.expm1(np.maximum(log_x, 0.0)))
        if self.spec.num_dense > 1:
            dense[:, 1] -= 2.0  # like Criteo's I2: small negative values occur
        dense[rng.random(dense.shape) < self.dense_missing] = np.nan
        return tokens, dense

    def _score(self, tokens: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """The unscaled teacher score c . relu(z) + w . z for raw inputs."""
        d = (transform_dense(dense) - self.dense_mean) / self.dense_std
        z = d.astype(np.float32) @ self.dense_map
        sq = (z * z).sum(1)
        for f, (u, a) in enumerate(zip(self.latents, self.maps)):
            if u.shape[1] == 0:
                continue
            t = tokens[:, f]
            lat = u[np.maximum(t, 0)]
            lat[t < 0] = 0.0
            zf = lat @ a
            sq += (zf * zf).sum(1)
            z += zf
        if __import__("os").environ.get("TEACHER") == "quad":
            return ((z * z).sum(1) - sq) / 2 / np.sqrt(HIDDEN) + z @ self.w
        return np.maximum(z, 0.0) @ self.c + z @ self.w

    def logit(self, tokens: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """The teacher's click logit for tokens (popularity ranks) and raw dense values."""
        return self.bias + self.scale * self._score(tokens, dense)

    def sample(self, rng: np.random.Generator, n: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(labels, tokens, raw dense, logits) of n fresh rows."""
        tokens, dense = self._draw_inputs(rng, n)
        logit = self.logit(tokens, dense)
        labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
        return labels, tokens, dense, logit


def _arrow_chunk(teacher: Teacher, values: List[pa.Array], labels: np.ndarray, tokens: np.ndarray,
                 dense: np.ndarray, fmt: str) -> pa.Table:
    """One chunk as a table: integer label and dense for TSV, the canonical schema for Parquet."""
    schema = teacher.spec.schema()
    cols: Dict[str, pa.Array] = {}
    empty = np.isnan(dense)
    if fmt == "tsv":
        cols[LABEL] = pa.array(labels)
        for j, n in enumerate(schema.dense):
            cols[n] = pa.array(np.nan_to_num(dense[:, j]).astype(np.int64), mask=empty[:, j])
    else:
        cols[LABEL] = pa.array(labels.astype(np.float32))
        for j, n in enumerate(schema.dense):
            cols[n] = pa.array(dense[:, j].astype(np.float32), mask=empty[:, j])
    for f, n in enumerate(schema.sparse):
        t = tokens[:, f]
        cols[n] = values[f].take(pa.array(np.maximum(t, 0), mask=t < 0))
    return pa.table(cols)


def synth_paths(out: Path, fmt: str) -> Tuple[Path, Path]:
    """(data file, ground-truth JSON) for an output that is a file name or a directory."""
    if out.suffix in (".tsv", ".txt", ".parquet", ".csv"):
        return out, out.with_name(out.stem + ".ground_truth.json")
    return out / ("synth.tsv" if fmt == "tsv" else "synth.parquet"), out / "ground_truth.json"


def generate(spec: SynthSpec, out: Path, fmt: str = "tsv", split: Sequence[float] = (0.8, 0.1, 0.1),
             split_by: str = "hash", progress: bool = True) -> Dict[str, Any]:
    """Writes `spec.rows` rows to `out` (file or directory) plus ground_truth.json; returns the truth."""
    if fmt not in ("tsv", "parquet"):
        raise ValueError(f"synth format must be tsv or parquet, got {fmt!r}")
    data_path, truth_path = synth_paths(Path(out), fmt)
    teacher = Teacher(spec)
    values = [teacher.value_strings(f) for f in range(spec.num_sparse)]
    test_logits, test_labels, clicks = [], [], 0
    with atomic_path(data_path) as tmp:
        writer = None
        starts = range(0, spec.rows, CHUNK_ROWS)
        for c, start in enumerate(tqdm(starts, desc=f"synth {data_path.name}", unit="chunk", disable=not progress)):
            n = min(CHUNK_ROWS, spec.rows - start)
            labels, tokens, dense, logit = teacher.sample(np.random.default_rng([spec.seed, 2, c]), n)
            table = _arrow_chunk(teacher, values, labels, tokens, dense, fmt)
            if writer is None:
                writer = pacsv.CSVWriter(str(tmp), table.schema, write_options=pacsv.WriteOptions(
                    include_header=False, delimiter="\t", quoting_style="none")) if fmt == "tsv" \
                    else pq.ParquetWriter(str(tmp), table.schema)
            writer.write_table(table)
            is_test = assign_splits(np.arange(start, start + n), spec.rows, split, split_by) == 2
            test_logits.append(logit[is_test])
            test_labels.append(labels[is_test])
            clicks += int(labels.sum())
        writer.close()
    truth = _ground_truth(teacher, np.concatenate(test_logits), np.concatenate(test_labels), clicks, split, split_by)
    if spec.tail_capacity:
        cap_path = truth_path.with_name(truth_path.name.replace("ground_truth.json", "token_capacity.parquet"))
        _write_token_capacity(teacher, values, cap_path)
        truth["token_capacity_file"] = cap_path.name
    truth["data_file"] = data_path.name
    atomic_write_json(truth_path, truth)  # last: its presence marks a complete generation
    return truth


def _ground_truth(teacher: Teacher, test_logits: np.ndarray, test_labels: np.ndarray, clicks: int,
                  split: Sequence[float], split_by: str) -> Dict[str, Any]:
    """The planted facts and the teacher's own test metrics."""
    from sharded_mde.train.metrics import classification_metrics

    spec, schema = teacher.spec, teacher.spec.schema()
    test = classification_metrics(torch.from_numpy(test_logits.astype(np.float32)),
                                  torch.from_numpy(test_labels.astype(np.float32)))
    fields = {n: {"vocab_size": teacher.vocab_sizes[f], "rank": teacher.ranks[f],
                  "missing_rate": round(float(teacher.missing[f]), 4), "head_size": teacher.head_sizes[f],
                  "head_capacity": teacher.ranks[f], "tail_capacity": int(teacher.capacity[f][-1])}
              for f, n in enumerate(schema.sparse)}
    return {
        "format_version": SYNTH_VERSION,
        "fingerprint": spec.fingerprint(),
        "spec": {**asdict(spec), "ranks": list(teacher.ranks)},
        "rows": spec.rows,
        "ranks": {n: teacher.ranks[f] for f, n in enumerate(schema.sparse)},
        "vocab_sizes": {n: teacher.vocab_sizes[f] for f, n in enumerate(schema.sparse)},
        "fields": fields,
        "dense": {n: {"missing_rate": round(float(teacher.dense_missing[j]), 4)} for j, n in enumerate(schema.dense)},
        "teacher": {"hidden": HIDDEN, "linear_weight": LINEAR_WEIGHT, "logit_scale": teacher.scale,
                    "bias": teacher.bias, "head_mass": HEAD_MASS if spec.tail_capacity else 1.0,
                    "test_auc": test["auc"], "test_logloss": test["logloss"], "test_rows": test["rows"],
                    "test_ctr": test["ctr"], "ctr": clicks / spec.rows},
        "split": list(split),
        "split_by": split_by,
    }


def _write_token_capacity(teacher: Teacher, values: List[pa.Array], path: Path) -> None:
    """Per token: field, raw value, popularity rank, probability and planted capacity."""
    parts = []
    for f, n in enumerate(teacher.spec.schema().sparse):
        v = teacher.vocab_sizes[f]
        prob = np.diff(teacher.cdf[f], prepend=0.0)
        parts.append(pa.table({"field": pa.array([n] * v), "value": values[f],
                               "popularity_rank": pa.array(np.arange(v, dtype=np.int32)),
                               "probability": pa.array(prob.astype(np.float32)),
                               "capacity": pa.array(teacher.capacity[f])}))
    with atomic_path(path) as tmp:
        pq.write_table(pa.concat_tables(parts), tmp)


def load_ground_truth(path: Path) -> Optional[Dict[str, Any]]:
    """A complete generation's ground truth, or None when absent."""
    from sharded_mde.io import read_json

    return read_json(path, "synthetic ground truth") if Path(path).exists() else None
