"""2-rank gloo training under table-, row- and column-wise plans, then compact export and serving.

The export of a compact model must score exactly like that model (unsharded, same weights); the
export of a supernet (HAM-masked, or a plain model with columns cut through a dims file) must score
like the hard-masked supernet within 1e-6.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from torchrec.datasets.utils import Batch

from dist_utils import random_batch, run_ranks, table_configs, train_step
from sharded_mde.config import ModelConfig, TrainConfig
from sharded_mde.export import export_compact, load_export
from sharded_mde.io import atomic_torch_save
from sharded_mde.modules.masked_ebc import MaskedEmbeddingBagCollection
from sharded_mde.modules.model import build_model
from sharded_mde.dims import DimsFile, TableDims, table_bytes
from sharded_mde.plan.sharding import manual_plan
from sharded_mde.train.checkpoint import MODEL, CheckpointReader, save_checkpoint
from sharded_mde.train.sharding import ebc_path, make_optimizer, wrap_model

FEATURES = ["C1", "C2", "C3", "C4", "C5"]
SPEC = [("C1", 60, 16), ("C2", 40, 8), ("C3", 50, 24), ("C4", 30, 8), ("C5", 45, 16)]
N_DENSE, B, STEPS = 4, 16, 3
KINDS = ["table_wise", "row_wise", "column_wise"]
# Columns the supernet keeps (a multiple of 4 per table; C4 is dropped). The HAM mask switches on
# all but the last kept column of C1 and C3: those columns are kept by the dims file but masked,
# as rounding a dim up to a legal one does, so folding the mask must zero them.
KEPT = {"t_C1": [0, 3, 5, 6, 9, 10, 12, 15], "t_C2": [1, 2, 4, 7], "t_C3": [0, 1, 2, 3, 8, 9, 10, 11, 20, 21, 22, 23],
        "t_C4": [], "t_C5": [2, 3, 4, 5]}
MASK_ON = {**KEPT, "t_C1": KEPT["t_C1"][:-1], "t_C3": KEPT["t_C3"][:-1]}
# (name, head, masked): the models trained under every plan
MODELS = [("dlrm", "dlrm", False), ("dcn", "dcn", False), ("ham", "dlrm", True)]


def _model_cfg(head: str) -> ModelConfig:
    return ModelConfig(head=head, dense_arch=[8, 8], over_arch=[16, 1], dcn_rank=4)


def _batch(seed: int) -> Batch:
    return random_batch(SPEC, B, N_DENSE, seed, max_bag=3)


def _build(head: str, masked: bool, device: torch.device):
    sparse = None
    if masked:
        sparse = MaskedEmbeddingBagCollection(table_configs(SPEC), device=device, mask_init=-1.0)
        sparse.gate.set_kept(MASK_ON)
    return build_model(_model_cfg(head), table_configs(SPEC), FEATURES, N_DENSE, sparse_arch=sparse, device=device)


def _train(rank: int, world: int, root: str) -> None:
    tcfg = TrainConfig(embedding_optimizer="rowwise_adagrad", embedding_lr=0.1, dense_optimizer="adam", dense_lr=0.01)
    for kind in KINDS:
        for name, head, masked in MODELS:
            torch.manual_seed(0)
            model = _build(head, masked, torch.device("meta"))
            plan = manual_plan(table_configs(SPEC), kind, world, module_fqn=ebc_path(model), device_type="cpu")
            dmp = wrap_model(model, plan, tcfg, torch.device("cpu"))
            opt = make_optimizer(dmp, tcfg)
            for step in range(STEPS):
                train_step(dmp, opt, _batch(100 * step + rank))
            dmp.eval()
            with torch.no_grad():
                _, (_, logits, _) = dmp(_batch(999 + rank))
            out = Path(root) / kind / name
            atomic_torch_save(out / f"dmp_logits_rank{rank}.pt", logits)
            save_checkpoint(out / "checkpoints", STEPS, {MODEL: dmp.state_dict()}, {})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export_dist")
    run_ranks(_train, str(root))
    return root


def _gathered(ckpt: Path) -> Dict[str, torch.Tensor]:
    """The whole model state of the checkpoint (test reference: simply all in memory, assembled by DCP)."""
    reader = CheckpointReader(ckpt)
    return reader.tensors(reader.keys)


def _reference(head: str, masked: bool, state: Dict[str, torch.Tensor], zero_outside: Optional[Dict[str, List[int]]]):
    """The unsharded model with the checkpoint's weights; `zero_outside` zeroes the columns a mask removes."""
    model = _build(head, masked, torch.device("cpu"))
    state = dict(state)
    for t, cols in (zero_outside or {}).items():
        key = next(k for k in state if k.endswith(f"embedding_bags.{t}.weight"))
        keep = torch.zeros(state[key].shape[1], dtype=torch.bool)
        keep[cols] = True
        state[key] = state[key] * keep
    model.load_state_dict(state)
    model.eval()
    return model


def _dims() -> DimsFile:
    tables = [TableDims(name=f"t_{f}", features=[f], num_embeddings=r, full_dim=d, dim=len(KEPT[f"t_{f}"]),
                        kept_columns=KEPT[f"t_{f}"], bytes=table_bytes(r, len(KEPT[f"t_{f}"])).total)
              for f, r, d in SPEC]
    full = sum(table_bytes(r, d).total for _, r, d in SPEC)
    kept = sum(t.bytes for t in tables)
    return DimsFile(method="ham", budget_fraction=0.5, budget_bytes=kept, full_bytes=full, kept_bytes=kept, tables=tables)


def _serve(ckpt: Path, out: Path, head: str, dims: Optional[DimsFile] = None) -> torch.Tensor:
    export_compact(ckpt, out, _model_cfg(head), FEATURES, N_DENSE, table_configs(SPEC), dims=dims, progress=False)
    model = load_export(out)
    b = _batch(999)
    with torch.no_grad():
        return model(b.dense_features, b.sparse_features)


@pytest.mark.parametrize("kind", KINDS)
def test_export_of_compact_model_scores_exactly_like_it(trained: Path, kind: str, tmp_path: Path) -> None:
    for name, head, _ in MODELS[:2]:
        ckpt = trained / kind / name / "checkpoints"
        served = _serve(ckpt, tmp_path / name, head)
        ref = _reference(head, False, _gathered(ckpt / f"step_{STEPS:09d}"), None)
        b = _batch(999)
        with torch.no_grad():
            want = ref.model(b.dense_features, b.sparse_features).squeeze(-1)
        assert torch.equal(served, want), (kind, name, float((served - want).abs().max()))
        dmp_logits = torch.load(trained / kind / name / "dmp_logits_rank0.pt")
        torch.testing.assert_close(served, dmp_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_export_of_supernet_scores_like_the_hard_masked_supernet(trained: Path, kind: str, tmp_path: Path) -> None:
    b = _batch(999)
    # HAM: the mask saved in the checkpoint is folded; the dims file names the kept columns.
    ckpt = trained / kind / "ham" / "checkpoints"
    served = _serve(ckpt, tmp_path / "ham", "dlrm", _dims())
    supernet = _reference("dlrm", True, _gathered(ckpt / f"step_{STEPS:09d}"), None)
    with torch.no_grad():
        want = supernet.model(b.dense_features, b.sparse_features).squeeze(-1)
    assert float((served - want).abs().max()) <= 1e-6
    manifest = (tmp_path / "ham" / "manifest.json").read_text()
    assert '"masked": true' in manifest and '"t_C4"' in manifest  # t_C4 is dropped, listed as such
    tables = {t.name: t for t in load_export(tmp_path / "ham").head.sparse_arch.embedding_bag_configs()}
    assert {n: t.embedding_dim for n, t in tables.items()} == {n: len(c) for n, c in KEPT.items() if c}
    # a dims file that drops a column the mask keeps: the export warns (it masks that column too)
    dims = _dims()
    dims.table("t_C2").kept_columns = [0, 2, 4, 7]
    with pytest.warns(UserWarning, match=r"table t_C2: the mask keeps columns \[1\] that the dims file drops"):
        export_compact(ckpt, tmp_path / "warn", _model_cfg("dlrm"), FEATURES, N_DENSE, table_configs(SPEC), dims=dims,
                       progress=False)
    # A plain model cut by the dims file alone equals that model with the other columns zeroed.
    for name, head, _ in MODELS[:2]:
        ckpt = trained / kind / name / "checkpoints"
        served = _serve(ckpt, tmp_path / f"cut_{name}", head, _dims())
        cut = _reference(head, False, _gathered(ckpt / f"step_{STEPS:09d}"), KEPT)
        with torch.no_grad():
            want = cut.model(b.dense_features, b.sparse_features).squeeze(-1)
        assert float((served - want).abs().max()) <= 1e-6, (kind, name)
