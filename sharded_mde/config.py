"""Typed configuration: dataclasses loaded from YAML and validated on load.

Every stage owns one section dataclass; `RunConfig` composes them. Loading rejects unknown keys,
wrong types and missing required values with an error that names the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Type, TypeVar, Union

import yaml

from sharded_mde.dims.methods import SEARCH_METHODS

T = TypeVar("T")
CAPS = "caps"  # search.budget: the plan section's per-rank caps instead of a fraction


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp` and converts it (dataclasses, lists, dicts)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = args or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        k_tp, v_tp = args or (Any, Any)
        return {_convert(k, k_tp, f"{key}.<key>"): _convert(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls: Type[T], data: Dict[str, Any], prefix: str = "") -> T:
    """Builds dataclass `cls` from a mapping, rejecting unknown keys and wrong types by dotted key."""
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dotted = (prefix + ".") if prefix else ""
    for k in data:
        if k not in names:
            raise ConfigError(f"{dotted}{k}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for name, f in names.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], dotted + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{dotted}{name}: missing required value")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{dotted}{e}") from None
    return obj


def to_dict(obj: Any) -> Dict[str, Any]:
    """The plain-YAML form of a config dataclass (what `load_config` reads back)."""
    return dataclasses.asdict(obj)


def load_yaml(path: str | Path) -> Dict[str, Any]:
    """Reads a YAML mapping; a missing file or a syntax error is one line naming the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: config is not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- sections


TEXT_FORMATS = ("csv", "tsv", "criteo_tsv", "avazu_csv")  # delimited text (docs/data.md)
DATA_FORMATS = ("synth", *TEXT_FORMATS, "parquet")
COLUMN_ROLES = ("dense", "sparse", "drop")  # what a declared column is (data.dense, data.sparse, data.drop)
VALUE_TYPES = ("string", "int", "float")  # data.types
UNDECLARED = ("guess", "drop", "error")  # data.undeclared


@dataclass
class DataConfig:
    """Where the data comes from and how it is preprocessed into Parquet splits."""

    format: str = "synth"  # synth | criteo_tsv | avazu_csv | csv | tsv | parquet (docs/data.md: declared schemas)
    paths: List[str] = field(default_factory=list)  # input files (raw formats) or Parquet files
    dir: str = "data/demo"  # processed data directory (splits, vocabulary)
    min_count: int = 1  # values seen fewer times share the out-of-vocabulary id
    max_vocab: int = 0  # 0 = unlimited; else keep at most this many values per field
    split: List[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/valid/test
    split_by: str = "hash"  # hash (of the row index) | sequential (contiguous blocks, time-ordered logs)
    strict: bool = False  # True: a malformed line is an error; False: skipped, counted, warned
    max_rows: int = 0  # 0 = the whole input; else its first max_rows rows (skipped lines count)
    # labels must be 0/1; other codes need a map, e.g. {"-1": 0, "1": 1} (keys: the codes as numbers or strings)
    label_map: Dict[Any, int] = field(default_factory=dict)
    # text formats: categorical columns holding several values, split at a separator, e.g. {genres: "|"}
    # (Parquet list<string> columns are multi-valued without an entry here)
    multi_valued: Dict[str, str] = field(default_factory=dict)
    # declared input schema (docs/data.md), laid over the format's preset column by column
    label: str = ""  # the label column's name in the input ("" = the preset's: label; avazu_csv: click)
    header: Optional[bool] = None  # text: the first line names the columns (None = the preset's: csv/tsv yes)
    columns: List[str] = field(default_factory=list)  # text without a header: every column's name, in file order
    delimiter: str = ""  # text: one character ("" = the preset's: "," for csv/avazu_csv, tab for tsv/criteo_tsv)
    dense: List[str] = field(default_factory=list)  # columns that are dense (numbers), whatever their dtype
    sparse: List[str] = field(default_factory=list)  # columns that are categorical, whatever their dtype
    drop: List[str] = field(default_factory=list)  # columns not read
    types: Dict[str, str] = field(default_factory=dict)  # column -> string | int | float: values checked, normalised
    undeclared: str = "guess"  # a column without a role: guess (text: sparse; Parquet: by dtype) | drop | error
    # synthetic generator (format: synth)
    synth_rows: int = 200_000
    synth_seed: int = 0
    synth_num_dense: int = 13
    synth_num_sparse: int = 26
    synth_vocab_min: int = 100
    synth_vocab_max: int = 200_000
    synth_zipf: float = 1.1
    synth_ranks: List[int] = field(default_factory=list)  # planted rank per field; empty = default
    synth_tail_capacity: bool = False  # tail tokens carry fewer informative coordinates
    synth_teacher: str = "mlp"  # mlp (original: network on summed latents) | factorised (pairwise dot products)
    synth_latent_dim: int = 32  # factorised teacher: dim K of the shared space the token vectors live in
    synth_vocab_sizes: List[int] = field(default_factory=list)  # per field; empty = log-spaced synth_vocab_min..max
    # counting pass: MB of value counts held in memory; beyond it they spill to hash-partitioned files
    # under data.dir, added up one partition at a time (same vocabularies; 0 = no bound)
    count_memory_mb: int = 1024

    def __post_init__(self) -> None:
        # one spelling per code ("-1", -1 and -1.0 alike), so that the fingerprint's JSON is well defined
        self.label_map = {(f"{label_code(k):g}" if label_code(k) is not None else str(k)): v
                          for k, v in self.label_map.items()}

    def validate(self) -> None:
        if self.format not in DATA_FORMATS:
            raise ConfigError(f"format: one of {', '.join(DATA_FORMATS)}, got {self.format!r}")
        if len(self.split) != 3 or any(s < 0 for s in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise ConfigError(f"split: three non-negative fractions summing to 1, got {self.split}")
        if self.min_count < 1:
            raise ConfigError(f"min_count: must be >= 1, got {self.min_count}")
        if self.split_by not in ("hash", "sequential"):
            raise ConfigError(f"split_by: hash or sequential, got {self.split_by!r}")
        for code, to in self.label_map.items():
            if label_code(code) is None:
                raise ConfigError(f"label_map.{code}: a label code must be a number, got {code!r}")
            if to not in (0, 1):
                raise ConfigError(f"label_map.{code}: must map to 0 or 1, got {to!r}")
        for name, sep in self.multi_valued.items():
            if not sep:
                raise ConfigError(f"multi_valued.{name}: the separator must not be empty")
        if self.count_memory_mb < 0:
            raise ConfigError(f"count_memory_mb: must be >= 0 (0 = no bound), got {self.count_memory_mb}")
        self._validate_schema()

    def _validate_schema(self) -> None:
        """The declared input schema's keys agree with each other and with the format."""
        for key in ("header", "columns", "delimiter"):
            if getattr(self, key) not in (None, [], "") and self.format not in TEXT_FORMATS:
                raise ConfigError(f"{key}: only for text formats ({', '.join(TEXT_FORMATS)}), not {self.format}")
        if self.format == "synth":
            for key in ("label", "dense", "sparse", "drop", "types"):
                if getattr(self, key):
                    raise ConfigError(f"{key}: the synthetic generator has its own schema (only for file formats)")
        if self.delimiter and (len(self.delimiter) != 1 or self.delimiter in '\r\n"'):
            raise ConfigError(f"delimiter: one character other than a quote or line break, got {self.delimiter!r}")
        headerless = self.header is False or (self.header is None and self.format == "criteo_tsv")
        if self.columns and not headerless:
            raise ConfigError("columns: only for text without a header (header: false); a header names the columns")
        if self.header is False and self.format in ("csv", "tsv", "avazu_csv") and not self.columns:
            raise ConfigError("columns: text without a header needs every column's name, in file order")
        if len(set(self.columns)) != len(self.columns):
            raise ConfigError(f"columns: names must be distinct, got {self.columns}")
        if self.undeclared not in UNDECLARED:
            raise ConfigError(f"undeclared: one of {', '.join(UNDECLARED)}, got {self.undeclared!r}")
        seen: Dict[str, str] = {}
        for role in COLUMN_ROLES:
            for name in getattr(self, role):
                if name in seen:
                    raise ConfigError(f"{role}.{name}: also listed in {seen[name]}")
                if name == self.label:
                    raise ConfigError(f"{role}.{name}: is the label column (data.label)")
                if self.columns and name not in self.columns:
                    raise ConfigError(f"{role}.{name}: not one of data.columns")
                seen[name] = role
        if self.label and self.columns and self.label not in self.columns:
            raise ConfigError(f"label: {self.label!r} is not one of data.columns")
        for name, kind in self.types.items():
            if kind not in VALUE_TYPES:
                raise ConfigError(f"types.{name}: one of {', '.join(VALUE_TYPES)}, got {kind!r}")
            if self.columns and name not in self.columns:
                raise ConfigError(f"types.{name}: not one of data.columns")
            if kind == "string" and seen.get(name) == "dense":
                raise ConfigError(f"types.{name}: a dense column holds numbers (int or float), got string")
        for name in self.multi_valued:
            if seen.get(name) in ("dense", "drop"):
                raise ConfigError(f"multi_valued.{name}: a multi-valued column is sparse, but data.{seen[name]} "
                                  f"lists it")

    def label_codes(self) -> Dict[float, float]:
        """Raw label value -> 0/1: `label_map` when given, else 0 and 1 as they are."""
        if not self.label_map:
            return {0.0: 0.0, 1.0: 1.0}
        return {label_code(k): float(v) for k, v in self.label_map.items()}


def label_code(key: Any) -> Optional[float]:
    """A label_map key (number or number string) as a float label value; None if it is not a number."""
    if isinstance(key, bool):
        return None
    try:
        value = float(key)
    except (TypeError, ValueError):
        return None
    return value if value == value and abs(value) != float("inf") else None


POOLING_MODES = ("sum", "mean")  # how a multi-valued field's bag of ids is pooled (TorchRec PoolingType)
FULL_WIDTH_MODES = ("project", "identity")  # model.full_width: what the dlrm head does with a field already at D


@dataclass
class ModelConfig:
    """The recommendation model: embedding dims and the head that consumes mixed dims."""

    head: str = "dlrm"  # dlrm (MixedDimDLRM) | dcn (MixedDimDCN)
    embedding_dim: int = 16  # full (supernet) dim of every table unless overridden
    table_dims: Dict[str, int] = field(default_factory=dict)  # per-table overrides
    dense_arch: List[int] = field(default_factory=lambda: [64, 16])  # last = interaction dim
    over_arch: List[int] = field(default_factory=lambda: [64, 32, 1])
    dcn_layers: int = 2
    dcn_rank: int = 16
    # dlrm head, a field whose width equals the interaction dim (dense_arch[-1]): identity (passed
    # through, no parameters: the reference MD-embeddings code, and stock DLRM when every field is at D)
    # | project (a learned Linear(D -> D) like every narrower field)
    full_width: str = "identity"
    pooling: Dict[str, str] = field(default_factory=dict)  # feature -> sum | mean (bag pooling); unlisted: sum

    def validate(self) -> None:
        if self.head not in ("dlrm", "dcn"):
            raise ConfigError(f"head: must be dlrm or dcn, got {self.head!r}")
        if self.full_width not in FULL_WIDTH_MODES:
            raise ConfigError(f"full_width: must be {' or '.join(FULL_WIDTH_MODES)}, got {self.full_width!r}")
        for feature, mode in self.pooling.items():
            if mode not in POOLING_MODES:
                raise ConfigError(f"pooling.{feature}: one of {', '.join(POOLING_MODES)}, got {mode!r}")
        for name, d in {"embedding_dim": self.embedding_dim, **{f"table_dims.{k}": v for k, v in self.table_dims.items()}}.items():
            if d < 4 or d % 4:
                raise ConfigError(f"{name}: embedding dims must be multiples of 4 and >= 4 (FBGEMM TBE), got {d}")
        if not self.over_arch or self.over_arch[-1] != 1:
            raise ConfigError(f"over_arch: last layer must be 1 (the logit), got {self.over_arch}")
        if not self.dense_arch:
            raise ConfigError("dense_arch: needs at least one layer")


@dataclass
class TrainConfig:
    """Optimisation, batching, evaluation and checkpointing."""

    batch_size: int = 4096  # per rank
    epochs: float = 1.0
    embedding_optimizer: str = "rowwise_adagrad"  # rowwise_adagrad | adagrad | sgd (fused, in backward)
    embedding_lr: float = 0.05
    dense_optimizer: str = "adam"  # adam | sgd
    dense_lr: float = 1e-3
    eval_every: int = 0  # steps; 0 = at the end of each epoch only
    eval_batches: int = 0  # 0 = the whole split
    checkpoint_every: int = 500  # steps
    seed: int = 0
    plan_file: str = ""  # saved ShardingPlan JSON to load instead of planning
    sharding: str = "planner"  # planner | table_wise | row_wise | column_wise (all tables)
    progress: bool = True

    def validate(self) -> None:
        if self.embedding_optimizer not in ("rowwise_adagrad", "adagrad", "sgd"):
            raise ConfigError(f"embedding_optimizer: rowwise_adagrad, adagrad or sgd, got {self.embedding_optimizer!r}")
        if self.dense_optimizer not in ("adam", "sgd"):
            raise ConfigError(f"dense_optimizer: adam or sgd, got {self.dense_optimizer!r}")
        if self.batch_size < 1 or self.epochs <= 0:
            raise ConfigError("batch_size and epochs must be positive")
        if self.sharding not in ("planner", "table_wise", "row_wise", "column_wise"):
            raise ConfigError(f"sharding: planner, table_wise, row_wise or column_wise, got {self.sharding!r}")


@dataclass
class PmeConfig:
    """PME: token-wise sizes from saliency at initialisation (docs/pme.md)."""

    score_fraction: float = 0.03  # scoring batches, as a fraction of one training epoch's batches
    sizes: List[int] = field(default_factory=list)  # legal token sizes, multiples of 4 (0: pruned, on the OOV row, always legal); [] = 4, 8, 16, ..., dim
    combine: str = "pad"  # group outputs to the field width: pad (zeros, no bytes) | project (a Linear per group, counted when sizes are chosen)
    init_scale: float = 0.05  # tables start uniform(-s, s) when scored, so that fields' saliencies compare
    half_life: float = 0.25  # a row of d columns keeps 1 - 2^(-d / half_life) of a token's value (docs/pme.md)
    serve_split: str = ""  # "", valid or recent (the last training rows, validation's stand-in when tuning): a token's value is scaled by its count there over its training count
    serve_carry: bool = False  # served counts forecast per field from the served window and the training history (docs/pme.md)
    row_value: float = 0.0  # value added per scored row of a token: what a trained row learns beyond the first-order saliency (docs/pme.md)
    tail_share: float = 0.0  # share of kept tokens' training ids sent to the OOV row, so it learns the field's average token (docs/pme.md)

    def validate(self) -> None:
        if not 0 < self.score_fraction <= 1:
            raise ConfigError(f"score_fraction: a fraction in (0, 1], got {self.score_fraction}")
        if any(s < 0 or s % 4 for s in self.sizes) or len(set(self.sizes)) != len(self.sizes):
            raise ConfigError(f"sizes: distinct multiples of 4 (0 = pruned token), got {self.sizes}")
        if self.combine not in ("project", "pad"):
            raise ConfigError(f"combine: project or pad, got {self.combine!r}")
        if self.init_scale <= 0:
            raise ConfigError(f"init_scale: must be > 0, got {self.init_scale}")
        if self.half_life <= 0:
            raise ConfigError(f"half_life: columns, must be > 0, got {self.half_life}")
        if self.serve_split not in ("", "valid", "recent"):
            raise ConfigError(f"serve_split: '', valid or recent, got {self.serve_split!r}")
        if self.row_value < 0:
            raise ConfigError(f"row_value: value per scored row, must be >= 0, got {self.row_value}")
        if not 0 <= self.tail_share < 1:
            raise ConfigError(f"tail_share: a fraction in [0, 1), got {self.tail_share}")


@dataclass
class PrecisionConfig:
    """The serving-byte searches dims / precision / joint (docs/precision.md)."""

    dtypes: List[str] = field(default_factory=lambda: ["fp32", "fp16", "int8", "int4"])  # serving dtypes precision and joint may choose
    signal_budget: float = 1.0  # byte target of the shared supernet's masks (fraction of the training bytes; 1 = only the loss prunes)
    check: bool = True  # joint: train its allocation, dims alone's and precision alone's at the budget; the best on validation leaves
    qat_fraction: float = 0.0  # the last fraction of the compact model's training that sees its int8/int4 tables quantised (0 = off)
    pme_signal_scale: float = 8.0  # joint_pme: PME's groups are chosen at min(1, this x search.budget) of the training bytes

    def validate(self) -> None:
        bad = [q for q in self.dtypes if q not in ("fp32", "fp16", "int8", "int4")]
        if not self.dtypes or bad or len(set(self.dtypes)) != len(self.dtypes):
            raise ConfigError(f"dtypes: distinct serving dtypes of fp32, fp16, int8, int4, got {self.dtypes}")
        if not 0 < self.signal_budget <= 1:
            raise ConfigError(f"signal_budget: a fraction in (0, 1], got {self.signal_budget}")
        if not 0 <= self.qat_fraction <= 1:
            raise ConfigError(f"qat_fraction: a fraction in [0, 1], got {self.qat_fraction}")
        if not self.pme_signal_scale > 0:
            raise ConfigError(f"pme_signal_scale: a positive multiple of search.budget, got {self.pme_signal_scale}")


@dataclass
class SearchConfig:
    """The dimension search (HAM or PME) and its byte budget."""

    method: str = "ham"  # a search of the registry (sharded_mde/dims/methods.py): ham | pme | uniform | power_law | magnitude | saliency (the baselines: docs/baselines.md) | dims | precision | joint | joint_pme (serving bytes: docs/precision.md)
    budget: Union[float, str] = 0.25  # fraction of the full-dimension embedding bytes (weights + optimizer state; dims / precision / joint: fp32 serving bytes), or
    # "caps": the plan section's per-rank caps (ham, and plan --rule): the plan of the chosen dims fits every rank (docs/plan.md)
    caps_replan_every: int = 200  # budget "caps": steps between re-plans of the kept dims that re-derive the byte target
    epochs: float = 1.0  # supernet training length (replaces train.epochs during the search)
    allow_drop: bool = False  # HAM only: a field may be dropped where validation shows it harmless (docs/ham.md)
    drop_tolerance: float = 0.001  # a drop is harmless if the validation AUC falls by at most this much
    check_batches: int = 0  # validation batches of HAM's loss-effect measurement (0 = the whole split)
    check_epochs: float = 0.0  # training of each candidate in HAM's check (0 = train.epochs, as retrain trains)
    # HAM: hard auxiliary masks (docs/ham.md)
    surrogate: str = "identity"  # straight-through gradient of the 0/1 mask: identity | clipped | sigmoid
    mask_init: float = 0.05  # initial mask value a (every column starts kept: a > 0)
    mask_lr: float = 0.005  # the mask's learning rate (a moves about this much per step at lambda = 1)
    dual_lr: float = 0.1  # dual ascent rate: lambda changes by at most a factor exp(dual_lr) per step
    dual_tol: float = 0.02  # kept-bytes error (fraction of the full bytes) at which that rate is reached
    lambda_init: float = 0.1  # lambda when pruning starts (dimensionless: see docs/ham.md)
    warmup: float = 0.3  # fraction of the search before pruning starts (lambda = 0, the mask does not move)
    prune: float = 0.5  # fraction over which the kept-bytes target declines (cubic) to the budget
    uniform_price: float = 0.9  # share of the penalty that prices every column alike (0 = bytes only; docs/ham.md)
    ortho_weight: float = 0.1  # beta of the orthogonal regularity on the mean squared column correlation (0 = off)
    ortho_rows: int = 512  # batch rows the orthogonal regularity looks at (0 = the whole batch)
    ortho_every: int = 8  # the regularity is taken every this many steps, weighted by it (lazy regularisation)
    retrain_embedding_lr: float = 0.0  # the compact model's table learning rate (0 = train.embedding_lr), chosen on validation
    retrain_warm_start: bool = False  # retrain from the supernet's kept columns (else from scratch; docs/ham.md: warm
    # start is a second pass of the tables over the same rows, which overfits one-epoch CTR data)
    power_law_alpha: float = 0.3  # power_law: dim proportional to rows ** -alpha
    saliency_batches: int = 20  # saliency: training batches the column saliency is summed over
    # HAM front (docs/ham.md, "A front from one run"): decreasing budgets walked by one supernet, a dims file at
    # each; the last must equal `budget` (the run's dims.json is that point). [] = one budget.
    front: List[float] = field(default_factory=list)
    # the candidates HAM's check trains at every front point (ham | ham_mask | uniform | uniform_filled | power_law;
    # [] = HAM's own allocation, untrained: the front's default, docs/ham.md); a single search trains all five
    front_check: List[str] = field(default_factory=list)
    pme: PmeConfig = field(default_factory=PmeConfig)  # PME settings (method: pme)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)  # dims / precision / joint: budget in serving bytes

    def validate(self) -> None:
        if self.method not in SEARCH_METHODS:
            raise ConfigError(f"method: one of {', '.join(SEARCH_METHODS)}, got {self.method!r}")
        if isinstance(self.budget, str):
            if self.budget != CAPS:
                raise ConfigError(f"budget: a fraction in (0, 1] or {CAPS!r} (the plan section's per-rank caps), got {self.budget!r}")
            if self.method != "ham":
                raise ConfigError(f"budget: {CAPS!r} needs method ham (the other searches take a fraction), got method {self.method!r}")
        elif not 0 < self.budget <= 1:
            raise ConfigError(f"budget: a fraction in (0, 1], got {self.budget}")
        if self.caps_replan_every < 1:
            raise ConfigError(f"caps_replan_every: a step count >= 1, got {self.caps_replan_every}")
        if self.surrogate not in ("identity", "clipped", "sigmoid"):
            raise ConfigError(f"surrogate: identity, clipped or sigmoid, got {self.surrogate!r}")
        if self.epochs <= 0 or self.mask_lr <= 0 or self.dual_lr < 0 or self.dual_tol <= 0 or self.lambda_init <= 0:
            raise ConfigError("epochs, mask_lr, dual_tol and lambda_init must be positive and dual_lr >= 0")
        if self.warmup < 0 or self.prune < 0 or self.warmup + self.prune > 1:
            raise ConfigError(f"warmup and prune: fractions with warmup + prune <= 1, got {self.warmup}, {self.prune}")
        if not 0 <= self.uniform_price <= 1:
            raise ConfigError(f"uniform_price: a fraction in [0, 1], got {self.uniform_price}")
        if self.mask_init <= 0:
            raise ConfigError(f"mask_init: must be > 0 (every column starts kept), got {self.mask_init}")
        if self.ortho_weight < 0 or self.ortho_rows < 0:
            raise ConfigError("ortho_weight and ortho_rows must be >= 0")
        if self.ortho_every < 1:
            raise ConfigError(f"ortho_every: a step count >= 1, got {self.ortho_every}")
        if self.power_law_alpha < 0:
            raise ConfigError(f"power_law_alpha: must be >= 0, got {self.power_law_alpha}")
        if self.drop_tolerance < 0 or self.check_batches < 0 or self.check_epochs < 0:
            raise ConfigError("drop_tolerance, check_batches and check_epochs must be >= 0")
        if self.retrain_embedding_lr < 0:
            raise ConfigError(f"retrain_embedding_lr: must be >= 0 (0 = train.embedding_lr), got {self.retrain_embedding_lr}")
        if self.saliency_batches < 1:
            raise ConfigError(f"saliency_batches: must be >= 1, got {self.saliency_batches}")
        if self.front:
            if self.method != "ham":
                raise ConfigError(f"front: only HAM walks a front (method: ham), got method {self.method!r}")
            if any(not 0 < b <= 1 for b in self.front) or any(a <= b for a, b in zip(self.front, self.front[1:])):
                raise ConfigError(f"front: strictly decreasing fractions in (0, 1], got {self.front}")
            known = ("ham", "ham_mask", "uniform", "uniform_filled", "power_law")
            bad = [c for c in self.front_check if c not in known]
            if bad or (self.front_check and "ham" not in self.front_check):
                raise ConfigError(f"front_check: [] or candidates of HAM's check including ham ({', '.join(known)}), "
                                  f"got {self.front_check}")
            if self.retrain_warm_start:
                raise ConfigError("front: the points retrain from scratch (retrain_warm_start: false); a warm start "
                                  "would need the supernet as it was at each point")
            if isinstance(self.budget, str):
                raise ConfigError(f"front: walks fractions of the full bytes, not budget {self.budget!r}")
            if self.front[-1] != self.budget:
                raise ConfigError(f"front: the last budget must equal budget ({self.budget:g}), got {self.front[-1]:g}")


@dataclass
class PlanConfig:
    """The topology the tables are sharded over, and planner constraints."""

    world_size: int = 2
    compute_device: str = "cpu"  # cpu | cuda
    local_world_size: int = 0  # 0 = world_size (one host)
    hbm_cap_gb: float = 80.0  # GiB per rank (the planner's GB)
    ddr_cap_gb: float = 128.0  # GiB per rank
    batch_size: int = 4096  # per rank, for the planner's I/O estimate
    tables_preset: str = ""  # YAML list of full tables (configs/tables/); "" = data meta.json + model dims
    optimizer: str = "rowwise_adagrad"  # table optimizer whose state is counted: rowwise_adagrad | adagrad | adam | sgd
    storage_reserve: float = 0.15  # fraction of each rank's HBM kept free for dense parts and buffers
    allow_data_parallel: bool = False  # DP tables are replicated and trained by the dense optimizer
    # per-table planner constraints, keyed by table name or "*" (all tables): sharding_types,
    # compute_kernels, min_partition (multiple of 4), pooling_factor
    constraints: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"world_size: must be >= 1, got {self.world_size}")
        if self.compute_device not in ("cpu", "cuda"):
            raise ConfigError(f"compute_device: cpu or cuda, got {self.compute_device!r}")
        if self.local_world_size < 0 or (self.local_world_size and self.world_size % self.local_world_size):
            raise ConfigError(f"local_world_size: must divide world_size {self.world_size}, got {self.local_world_size}")
        if self.optimizer not in ("rowwise_adagrad", "adagrad", "adam", "sgd"):
            raise ConfigError(f"optimizer: rowwise_adagrad, adagrad, adam or sgd, got {self.optimizer!r}")
        if not 0 <= self.storage_reserve < 1:
            raise ConfigError(f"storage_reserve: a fraction in [0, 1), got {self.storage_reserve}")
        if self.hbm_cap_gb < 0 or self.ddr_cap_gb < 0 or self.batch_size < 1:
            raise ConfigError("hbm_cap_gb and ddr_cap_gb must be >= 0 and batch_size >= 1")
        allowed = {"sharding_types", "compute_kernels", "min_partition", "pooling_factor"}
        for table, c in self.constraints.items():
            unknown = sorted(set(c) - allowed)
            if unknown:
                raise ConfigError(f"constraints.{table}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")
            mp = c.get("min_partition")
            if mp is not None and (isinstance(mp, bool) or not isinstance(mp, int) or mp < 4 or mp % 4):
                raise ConfigError(f"constraints.{table}.min_partition: a multiple of 4 (FBGEMM column shards), got {mp!r}")


@dataclass
class ExportConfig:
    """Compact export for serving."""

    dtype: str = "fp32"  # stored table dtype: fp32 | fp16 | int8 | int4 (FBGEMM fused rows)
    serve_dtype: str = ""  # dtype the serving model loads the tables as; "" = the stored dtype
    row_alignment: int = 1  # quantised serving rows: 1 for CPU serving, 16 for TorchRec's GPU default
    block_rows: int = 65536  # rows per block read, converted and written (bounds export memory)
    serve_batch_size: int = 4096  # examples per request when scoring a split (serve-check, bench)

    def validate(self) -> None:
        for key in ("dtype", "serve_dtype"):
            value = getattr(self, key)
            if value not in ("fp32", "fp16", "int8", "int4") and not (key == "serve_dtype" and value == ""):
                raise ConfigError(f"{key}: fp32, fp16, int8 or int4, got {value!r}")
        if self.row_alignment < 1 or self.block_rows < 1 or self.serve_batch_size < 1:
            raise ConfigError("row_alignment, block_rows and serve_batch_size must be >= 1")


@dataclass
class RunConfig:
    """A whole run: every stage's section plus the run directory."""

    run_dir: str = "runs/demo"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def load_config(path: str | Path, overrides: Optional[Dict[str, Any]] = None) -> RunConfig:
    """Loads a YAML run config; errors name the file and the dotted key at fault."""
    data = load_yaml(path)
    if overrides:
        data = merge(data, overrides)
    try:
        return from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    """Deep-merges `over` into a copy of `base` (used for `--set a.b=c` overrides)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: List[str]) -> Dict[str, Any]:
    """Turns `["train.epochs=2", "model.head=dcn"]` into a nested mapping (values parsed as YAML)."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out
