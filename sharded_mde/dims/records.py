"""The typed records a dims file carries from the search to the stages after it.

Besides the per-table dims, a search leaves what a later stage needs: the checkpoint retrain
warm-starts from and the renumbered data of PME (plain fields of `DimsFile`), and the records
below: a rule's formula (the plan report names it), the agreement with planted ranks (the
pipeline, bench and report read it), HAM's candidate check (retrain reuses the winner's training)
PME's token-wise record (the token-group model reads its reserved ids and combine mode) and the
per-rank caps the dims were chosen under (the plan's bytes per rank, headroom).
`from_json` builds any of them from parsed JSON with one-line errors naming the file and key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class RuleRecord:
    """Dims made by a rule, not a search: its formula and parameters.

    Args:
        formula (str): the rule in words, e.g. "dim = min(full_dim, floor4(scale * rows ** -alpha))".
        alpha (float): the power-law exponent (0 for the uniform rule).
        scale (float): the scale the rule was solved for at the budget.

    Example::

        dims.rule = RuleRecord("dim ~ scale * rows ** -alpha", alpha=0.3, scale=12.5)
    """

    formula: str
    alpha: float
    scale: float


@dataclass
class PlantedAgreement:
    """Kept dims against the planted ranks of synthetic data (recorded when the data has a ground truth).

    Args:
        spearman (float): Spearman correlation of kept dims with planted ranks over the features (nan if either is constant).
        fields (int): the features compared.
        rank0_dims (Dict[str, int]): the kept dim of every feature planted at rank 0.
        rank0_at_most_4 (bool): every feature planted at rank 0 kept at most 4 columns.
        dims_vs_ranks (Dict[str, List[int]]): per feature, [kept dim, planted rank].

    Example::

        dims.planted.spearman  # 1.0: the kept dims order the fields as the planted ranks do
    """

    spearman: float
    fields: int
    rank0_dims: Dict[str, int]
    rank0_at_most_4: bool
    dims_vs_ranks: Dict[str, List[int]]


@dataclass
class CandidateScore:
    """One allocation of HAM's candidate check, trained as retrain would and scored on the validation split.

    Args:
        name (str): the candidate ("ham" is HAM's own allocation).
        dims (Dict[str, int]): its dim per table.
        kept_bytes (int): its bytes under the byte model.
        valid_auc (float): the validation AUC of its compact model.
        valid_logloss (float): the validation logloss of its compact model.
        same_as (Optional[str]): the earlier candidate with the same dims whose scores it shares (not trained again).

    Example::

        CandidateScore("ham", {"t_C1": 8}, 4096, valid_auc=0.71, valid_logloss=0.52)
    """

    name: str
    dims: Dict[str, int]
    kept_bytes: int
    valid_auc: float
    valid_logloss: float
    same_as: Optional[str] = None


@dataclass
class CandidateCheck:
    """HAM's candidate check: every candidate's validation scores, the winner and its margins.

    Args:
        candidates (List[CandidateScore]): every candidate, in the order they were scored.
        winner (str): the best validation AUC (then lower logloss, then fewer bytes).
        margin_vs_ham (float): the winner's validation AUC minus HAM's own allocation's.
        runner_up (Optional[str]): the best candidate with other dims than the winner (None if there is none).
        margin_vs_runner_up (Optional[float]): the winner's validation AUC minus the runner-up's.
        rule (str): how the winner was chosen, in words.
        winner_checkpoints (Optional[str]): the checkpoints of the winner's check training.
        winner_trained_as (Dict[str, Any]): the training record of those checkpoints (retrain reuses
            them when it would train the same).

    Example::

        check.candidate(check.winner).valid_auc
    """

    candidates: List[CandidateScore]
    winner: str
    margin_vs_ham: float
    runner_up: Optional[str] = None
    margin_vs_runner_up: Optional[float] = None
    rule: str = ""
    winner_checkpoints: Optional[str] = None
    winner_trained_as: Dict[str, Any] = field(default_factory=dict)

    def candidate(self, name: str) -> CandidateScore:
        """The candidate called `name` (KeyError naming it if absent)."""
        for c in self.candidates:
            if c.name == name:
                return c
        raise KeyError(f"candidate {name!r} is not in the check")


@dataclass
class PmeRecord:
    """What PME's token-wise search records besides the token groups.

    Args:
        reserved_sizes (Dict[str, List[int]]): per table, the size of each reserved id (padding, OOV).
        combine (Optional[str]): how the group tables' outputs are combined ("project" or "pad"), the mode
            the bytes were counted for (None: the config's `search.pme.combine`).
        tokens (Dict[str, Dict[str, Any]]): per feature, tokens per size and their correlations with
            frequency (and planted capacity); `search.pme_data.token_stats`.
        price (Optional[float]): the price (value per byte) the selection stopped at.
        selected_bytes (Optional[int]): the bytes of the selection.
        timing (Dict[str, float]): seconds of each part of the search.

    Example::

        dims.pme.reserved_sizes["t_C1"]  # [4, 8]: padding at size 4, OOV at size 8
    """

    reserved_sizes: Dict[str, List[int]] = field(default_factory=dict)
    combine: Optional[str] = None
    tokens: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    price: Optional[float] = None
    selected_bytes: Optional[int] = None
    timing: Dict[str, float] = field(default_factory=dict)


@dataclass
class CapsRecord:
    """Dims chosen under per-rank caps (`search.budget: caps`): the final plan's bytes per rank against the cap.

    Args:
        tier (str): the tier the cap is on ("hbm" on cuda, "ddr" on cpu).
        cap_gb (float): the configured capacity per rank (`plan.hbm_cap_gb` or `plan.ddr_cap_gb`, GiB).
        cap (int): the bytes per rank the planner may fill (`plan.caps.rank_caps`).
        bytes (List[int]): per rank, the planner's bytes of the final plan (weights, optimizer state, its buffers).
        raw (List[int]): per rank, the weights and optimizer state of the final plan's shards.
        headroom (List[int]): per rank, cap - bytes (>= 0: every rank fits).
        busiest_rank (int): the rank with the most bytes.
        full_busiest (int): the full tables' busiest rank in the planner's unconstrained plan (over `cap`: they do not fit).
        planner_calls (int): planner runs of the final check.
        trimmed (Dict[str, int]): columns the final check took from each table (busiest over-cap rank first).
        filled (Dict[str, int]): columns it gave back while every rank still fit.
        blocked (List[str]): tables below their largest dim whose next 4 columns find no plan within the caps.
        replans (List[Dict[str, float]]): the search's re-plans: step, kept bytes, busiest bytes, the new byte budget.

    Example::

        max(dims.caps.bytes) <= dims.caps.cap  # every rank fits
    """

    tier: str
    cap_gb: float
    cap: int
    bytes: List[int]
    raw: List[int]
    headroom: List[int]
    busiest_rank: int
    full_busiest: int
    planner_calls: int
    trimmed: Dict[str, int] = field(default_factory=dict)
    filled: Dict[str, int] = field(default_factory=dict)
    blocked: List[str] = field(default_factory=list)
    replans: List[Dict[str, float]] = field(default_factory=list)


def from_json(tp: Any, value: Any, file: str, key: str) -> Any:
    """Builds `tp` (a record above, or a JSON type: int, float, str, bool, Optional, List, Dict, Any)
    from parsed JSON; a ValueError naming `file` and the key path on a missing, unknown or mistyped key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{file}: {key} must be an object, got {type(value).__name__}")
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(tp)})
        if unknown:
            raise ValueError(f"{file}: {key} has an unknown key {unknown[0]!r}")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = from_json(hints[f.name], value[f.name], file, f"{key}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{file}: {key} is missing key {f.name!r}")
        return tp(**kwargs)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        return from_json(next(a for a in args if a is not type(None)), value, file, key)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{file}: {key} must be a list, got {type(value).__name__}")
        return [from_json(args[0], v, file, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{file}: {key} must be an object, got {type(value).__name__}")
        return {k: from_json(args[1], v, file, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
        return value
    raise ValueError(f"{file}: {key} must be {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")
