"""The shared vocabulary of every stage: legal dims, the byte model, and the dims file.

It sits below data, plan, modules, train, export and search, so that each of them can price a table
and read a dims file without importing a stage above it.
"""

from __future__ import annotations

from sharded_mde.dims.cost import (  # noqa: F401
    DIM_MULTIPLE,
    WEIGHT_BYTES,
    OPTIMIZER_BYTES,
    legal_dim,
    round_to_legal,
    InfeasibleBudget,
    TableBytes,
    table_bytes,
    column_cost,
    dims_bytes,
    full_bytes,
    budget_bytes,
    dim_cap,
    floor_bytes,
    smallest_feasible_fraction,
    check_feasible,
    SERVING_DTYPES,
    SCALE_BIAS_BYTES,
    TABLE_ALIGNMENT,
    serving_dim_multiple,
    legal_serving_dim,
    serving_row_bytes,
    serving_table_bytes,
    serving_bytes_of,
)
from sharded_mde.dims.records import (  # noqa: F401
    RuleRecord,
    PlantedAgreement,
    CandidateScore,
    CandidateCheck,
    PmeRecord,
    CapsRecord,
)
from sharded_mde.dims.file import (  # noqa: F401
    FORMAT_VERSION,
    table_name,
    group_name,
    TokenGroup,
    TableDims,
    DimsFile,
    save_dims,
    load_dims,
    validate_dims,
    check_against_tables,
)

__all__ = ["DIM_MULTIPLE", "WEIGHT_BYTES", "OPTIMIZER_BYTES", "legal_dim", "round_to_legal", "InfeasibleBudget", "TableBytes", "table_bytes", "column_cost", "dims_bytes", "full_bytes", "budget_bytes", "dim_cap", "floor_bytes", "smallest_feasible_fraction", "check_feasible", "RuleRecord", "PlantedAgreement", "CandidateScore", "CandidateCheck", "PmeRecord", "FORMAT_VERSION", "table_name", "group_name", "TokenGroup", "TableDims", "DimsFile", "save_dims", "load_dims", "validate_dims", "check_against_tables"]
