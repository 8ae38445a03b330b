"""The mixed-dim heads: batched projections equal the per-field ones, `slice_inputs` keeps outputs and
state-dict names, and the heads trace and script for serving; `model.full_width: identity` passes
full-width fields through (stock DLRM when every field is at D)."""

from __future__ import annotations

import copy
from typing import Dict, List

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.fx import symbolic_trace
from torchrec.models.dlrm import DLRM

from dist_utils import random_batch, table_configs
from sharded_mde.config import load_config
from sharded_mde.export.serve import LEAF_MODULES, ServingModel
from sharded_mde.modules.heads import MixedDimDLRM, build_head, projected_fields

N_DENSE, B = 3, 16
MIXED = [("C1", 30, 8), ("C2", 20, 4), ("C3", 25, 8), ("C4", 15, 16), ("C5", 10, 4)]  # widths 8, 4, 16 interleaved
EQUAL = [("C1", 30, 8), ("C2", 20, 8), ("C3", 25, 8)]  # one group in feature order


class PerFieldDLRM(MixedDimDLRM):
    """The head as it was: every field through its own Linear, one call per field (the reference)."""

    def _project(self, dense: torch.Tensor, embs: List[torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.projections[f](e) if self.feature_dims[f] else torch.zeros_like(dense)
                            for f, e in zip(self.features, embs)], dim=1)


def _heads(spec, feature_dims: Dict[str, int], dense_arch: List[int] = [8, 6], full_width: str = "project"):
    """(batched head, per-field reference) holding the same weights."""
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=table_configs(spec))
    head = MixedDimDLRM(ebc, feature_dims, N_DENSE, dense_arch, [8, 1], full_width)
    ref = PerFieldDLRM(copy.deepcopy(ebc), feature_dims, N_DENSE, dense_arch, [8, 1], full_width)
    ref.load_state_dict(head.state_dict())
    return head, ref


@pytest.mark.parametrize("spec,dropped,dense_arch,full_width", [
    (MIXED, [], [8, 6], "project"), (MIXED, ["C3"], [8, 6], "project"), (EQUAL, [], [8, 6], "project"),
    (MIXED, [], [8, 8], "project"), (MIXED, [], [8, 8], "identity"), (MIXED, ["C3"], [8, 8], "identity"),
    (MIXED, ["C2"], [8, 4], "identity")],
    ids=["mixed", "mixed_with_a_dropped_field", "equal", "mixed_at_d", "identity", "identity_with_a_dropped_field",
         "identity_narrow_d_dropped_identity_field"])
def test_batched_projections_equal_per_field_forward_and_backward(spec, dropped, dense_arch, full_width) -> None:
    """Also with `full_width: identity`: fields at D untouched, the others projected as one Linear each."""
    feature_dims = {f: (0 if f in dropped else d) for f, _, d in spec}
    live = [(f, r, d) for f, r, d in spec if f not in dropped]
    head, ref = _heads(live, feature_dims, dense_arch, full_width)
    identity = {f for f, m in head.projections.items() if isinstance(m, nn.Identity)}
    assert identity == ({f for f, d in feature_dims.items() if d == dense_arch[-1]} if full_width == "identity" else set())
    assert not any(k.startswith(f"projections.{f}.") for f in identity for k in head.state_dict())
    batch = random_batch(live, B, N_DENSE, seed=3)
    out, want = head(batch.dense_features, batch.sparse_features), ref(batch.dense_features, batch.sparse_features)
    assert want.abs().max() > 0
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    want.backward(g)
    grads = dict(ref.named_parameters())
    for name, p in head.named_parameters():
        if grads[name].grad is None:  # the unused Linear(1, D) of a field without a table
            assert p.grad is None and name.split(".")[1] in dropped, name
            continue
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    if identity:  # an identity field's embedding reaches the interaction as it is
        seen = []
        head.inter_arch.register_forward_pre_hook(lambda _, args: seen.append(args[1]))
        with torch.no_grad():
            head(batch.dense_features, batch.sparse_features)
            embs = head.sparse_arch(batch.sparse_features).to_dict()
        for f in identity:
            assert torch.equal(seen[0][:, head.features.index(f)], embs[f]), f


@pytest.mark.parametrize("dim", [8, 16])
def test_identity_at_equal_dims_is_stock_dlrm(dim: int) -> None:
    """`full_width: identity` with every field at D: the logits and gradients of TorchRec's DLRM with the same weights."""
    spec = [(f, r, dim) for f, r, _ in MIXED]
    torch.manual_seed(0)
    head = MixedDimDLRM(EmbeddingBagCollection(tables=table_configs(spec)), {f: d for f, _, d in spec}, N_DENSE,
                        [8, dim], [8, 4, 1], full_width="identity")
    assert not any(k.startswith("projections.") for k in head.state_dict())
    stock = DLRM(EmbeddingBagCollection(tables=table_configs(spec)), N_DENSE, [8, dim], [8, 4, 1])
    stock.sparse_arch.embedding_bag_collection.load_state_dict(head.sparse_arch.state_dict())
    stock.dense_arch.load_state_dict(head.dense_arch.state_dict())
    stock.over_arch.load_state_dict(head.over_arch.state_dict())
    batch = random_batch(spec, B, N_DENSE, seed=6)
    got, want = head(batch.dense_features, batch.sparse_features), stock(batch.dense_features, batch.sparse_features)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    got.sum().backward()
    want.sum().backward()
    for (name, p), (_, q) in zip(head.dense_arch.named_parameters(), stock.dense_arch.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("value", ["linear", "Identity", ""])
def test_full_width_config_rejects_other_values_naming_the_key(tmp_path, value: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  full_width: '{value}'\n")
    with pytest.raises(ValueError, match=r"model\.full_width: must be project or identity") as e:
        load_config(path)
    assert "\n" not in str(e.value)
    assert load_config(path, {"model": {"full_width": "identity"}}).model.full_width == "identity"
    with pytest.raises(ValueError, match="full_width"):
        MixedDimDLRM(nn.Module(), {"C1": 4}, N_DENSE, [8, 4], [8, 1], full_width=value)


def test_state_dict_keeps_one_linear_per_field() -> None:
    """Exports and checkpoints of the per-field head load unchanged: same names, same shapes."""
    head, _ = _heads(MIXED, {"C1": 8, "C2": 4, "C3": 0, "C4": 16, "C5": 4})
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items() if k.startswith("projections.")}
    assert shapes == {"projections.C1.weight": (6, 8), "projections.C2.weight": (6, 4), "projections.C3.weight": (6, 1),
                      "projections.C4.weight": (6, 16), "projections.C5.weight": (6, 4)}


def _hard_masked(spec, kept: Dict[str, List[int]]) -> Dict[str, torch.Tensor]:
    """Per table, a copy of its weight with every column outside `kept` zeroed (the search's hard mask)."""
    out = {}
    for f, _, d in spec:
        mask = torch.zeros(d)
        mask[kept[f]] = 1.0
        out[f] = mask
    return out


KEPT = {"C1": [0, 2, 5], "C2": [], "C3": list(range(8)), "C4": [1, 3, 4, 9], "C5": [2]}


@pytest.mark.parametrize("kind,full_width,dense_arch,kept", [
    ("dlrm", "project", [8, 6], KEPT), ("dcn", "project", [8, 6], KEPT),
    ("dlrm", "identity", [8, 8], KEPT),  # C1 (8 wide, 3 kept) and C3 (all kept) are identity fields
    ("dlrm", "identity", [8, 8], {**KEPT, "C1": [], "C3": [1, 7]}),  # an identity field dropped, another cut
    ("dlrm", "identity", [8, 8], {**KEPT, "C4": [0, 1, 2, 5, 8, 9, 12, 15]})],  # a 16-wide field cut to D = 8
    ids=["dlrm", "dcn", "dlrm_identity", "dlrm_identity_dropped", "dlrm_identity_wide_field_cut_to_d"])
def test_slice_inputs_equals_the_hard_masked_head_and_loads_into_a_fresh_one(kind: str, full_width: str,
                                                                              dense_arch: List[int], kept) -> None:
    """The sliced head computes what the full head computes on masked embeddings, and its state dict (what
    the export writes) loads strictly into a head built for the kept widths (what serving builds).

    A cut identity field becomes a Linear whose weight is the identity's kept columns; one that keeps
    every column stays an identity (no weight), as a head built for the kept widths has it; a wider
    field cut to D keeps its learned Linear, which the rebuilt head reads from the state's keys."""
    torch.manual_seed(0)
    full_dims = {f: d for f, _, d in MIXED}
    head = build_head(kind, EmbeddingBagCollection(tables=table_configs(MIXED)), full_dims, N_DENSE, dense_arch,
                      [8, 4, 1], dcn_layers=2, dcn_rank=3, full_width=full_width)
    masks = _hard_masked(MIXED, kept)
    with torch.no_grad():
        for name, p in head.named_parameters():  # nonzero everywhere (the crossnet's bias starts at zero)
            if not name.startswith("sparse_arch."):
                p.add_(0.1 * torch.randn(p.shape))
        for f, _, _ in MIXED:
            head.sparse_arch.embedding_bags[f"t_{f}"].weight.mul_(masks[f])
    batch = random_batch(MIXED, B, N_DENSE, seed=4)
    with torch.no_grad():
        want = head(batch.dense_features, batch.sparse_features)
    compact_spec = [(f, r, len(kept[f])) for f, r, _ in MIXED if kept[f]]
    compact = EmbeddingBagCollection(tables=table_configs(compact_spec))
    with torch.no_grad():
        for f, _, _ in compact_spec:
            compact.embedding_bags[f"t_{f}"].weight.copy_(head.sparse_arch.embedding_bags[f"t_{f}"].weight[:, kept[f]])
    head.slice_inputs({f: torch.tensor(c, dtype=torch.long) for f, c in kept.items()})
    head.sparse_arch = compact
    for f, c in kept.items():  # what became of each identity field
        if full_width == "identity" and full_dims[f] == dense_arch[-1]:
            proj = head.projections[f]
            if len(c) == full_dims[f]:
                assert isinstance(proj, nn.Identity), f
            else:
                want_weight = torch.eye(dense_arch[-1])[:, c] if c else torch.zeros(dense_arch[-1], 1)
                torch.testing.assert_close(proj.weight, want_weight, rtol=0, atol=0)
        elif kind == "dlrm":  # a projected field stays a Linear, also when cut to width D
            assert isinstance(head.projections[f], nn.Linear), f
    with torch.no_grad():
        got = head(batch.dense_features, batch.sparse_features)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    fresh = build_head(kind, EmbeddingBagCollection(tables=table_configs(compact_spec)),
                       {f: len(c) for f, c in kept.items()}, N_DENSE, dense_arch, [8, 4, 1], dcn_layers=2, dcn_rank=3,
                       full_width=full_width, projected=projected_fields(head.state_dict()))
    assert set(fresh.state_dict()) == set(head.state_dict())
    fresh.load_state_dict(head.state_dict())  # strict: same names and shapes
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch.dense_features, batch.sparse_features), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,full_width", [("dlrm", "project"), ("dcn", "project"), ("dlrm", "identity")])
def test_heads_trace_and_script_for_serving(kind: str, full_width: str) -> None:
    torch.manual_seed(0)
    dims = {"C1": 8, "C2": 4, "C3": 0, "C4": 16, "C5": 4}
    live = [t for t in MIXED if dims[t[0]]]
    head = build_head(kind, EmbeddingBagCollection(tables=table_configs(live)), dims, N_DENSE, [8, 8], [8, 1],
                      full_width=full_width)
    model = ServingModel(head).eval()
    scripted = torch.jit.script(symbolic_trace(model, leaf_modules=LEAF_MODULES))
    batch = random_batch(live, B, N_DENSE, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(scripted(batch.dense_features, batch.sparse_features),
                                   model(batch.dense_features, batch.sparse_features))


def test_heads_read_no_private_attribute_of_another_object() -> None:
    """The heads build TorchRec modules and use them through public attributes only (#17.5)."""
    import inspect
    import re

    from sharded_mde.modules import heads

    assert re.findall(r"(?<!self)\._(?!_)\w+", inspect.getsource(heads)) == []


def test_identity_head_exports_and_loads_like_the_hard_masked_supernet(tmp_path) -> None:
    """`full_width: identity` end to end: a supernet checkpoint cut by a dims file (an identity field cut,
    one kept whole, a 16-wide field cut to D) exports, and `load_export` rebuilds the same head from the
    manifest and the head weights (the manifest records `full_width` only when it is not `project`)."""
    import json

    from sharded_mde.config import ModelConfig
    from sharded_mde.dims import DimsFile, TableDims, table_bytes
    from sharded_mde.export import export_compact, load_export
    from sharded_mde.modules.heads import find_head
    from sharded_mde.modules.model import build_model
    from sharded_mde.train.checkpoint import MODEL, save_checkpoint

    kept = {**KEPT, "C4": [0, 1, 2, 5, 8, 9, 12, 15]}
    tables = table_configs(MIXED)
    model_cfg = ModelConfig(head="dlrm", dense_arch=[8, 8], over_arch=[8, 4, 1], full_width="identity")
    torch.manual_seed(0)
    model = build_model(model_cfg, tables, [f for f, _, _ in MIXED], N_DENSE, device=torch.device("cpu"))
    save_checkpoint(tmp_path / "checkpoints", 1, {MODEL: model.state_dict()}, {})
    dims = DimsFile(method="ham", budget_fraction=0.5, budget_bytes=1, full_bytes=1, kept_bytes=1, tables=[
        TableDims(name=f"t_{f}", features=[f], num_embeddings=r, full_dim=d, dim=len(kept[f]), kept_columns=kept[f],
                  bytes=table_bytes(r, len(kept[f])).total) for f, r, d in MIXED])
    manifest = export_compact(tmp_path / "checkpoints", tmp_path / "export", model_cfg, [f for f, _, _ in MIXED], N_DENSE,
                              tables, dims=dims, progress=False)
    assert json.loads((tmp_path / "export" / "manifest.json").read_text())["head"]["full_width"] == "identity"
    served = load_export(tmp_path / "export")
    kinds = {f: type(m).__name__ for f, m in find_head(served).projections.items()}
    assert kinds == {"C1": "Linear", "C2": "Linear", "C3": "Identity", "C4": "Linear", "C5": "Linear"}
    assert find_head(served).feature_dims == {f: len(c) for f, c in kept.items()} and manifest.head.full_width == "identity"
    with torch.no_grad():  # the supernet with every column outside the dims file zeroed
        for f, _, _ in MIXED:
            model.model.sparse_arch.embedding_bags[f"t_{f}"].weight.mul_(_hard_masked(MIXED, kept)[f])
        batch = random_batch(MIXED, B, N_DENSE, seed=7)
        want = model.model(batch.dense_features, batch.sparse_features).squeeze(-1)
        got = served(batch.dense_features, batch.sparse_features)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
