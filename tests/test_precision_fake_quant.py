"""Fake-quantised tables score what TorchRec's quantised EBC serves; config validation of search.precision."""

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.modules.embedding_configs import DataType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from sharded_mde.config import ConfigError, RunConfig, from_dict
from sharded_mde.search.fake_quant import fake_quantized, served_dtypes
from sharded_mde.dims import TableDims, TokenGroup

from sharded_mde.dims import SCALE_BIAS_BYTES
from sharded_mde.export.tablefile import encode

DATA_TYPE = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8, "int4": DataType.INT4}


@torch.no_grad()
def _served(ebc, dtypes):
    """TorchRec's quantised EBC (FBGEMM inference TBEs, per-table weight dtypes) holding the export's encoded rows."""
    configs = [EmbeddingBagConfig(name=t.name, embedding_dim=t.embedding_dim, num_embeddings=t.num_embeddings,
                                  feature_names=t.feature_names, pooling=t.pooling, data_type=DATA_TYPE[dtypes[t.name]])
               for t in ebc.embedding_bag_configs()]
    qebc = QuantEmbeddingBagCollection(configs, is_weighted=False, device=torch.device("cpu"), output_dtype=torch.float,
                                       register_tbes=True, row_alignment=1)
    for tbe in qebc.tbes:
        for spec, (weight, scale_bias) in zip(tbe.embedding_specs, tbe.split_embedding_weights()):
            rows = encode(ebc.embedding_bags[spec[0]].weight.detach(), dtypes[spec[0]])
            weight.copy_(rows[:, :weight.shape[1]])
            if scale_bias is not None:
                scale_bias.copy_(rows[:, weight.shape[1]:weight.shape[1] + SCALE_BIAS_BYTES])
    return qebc


def _ebc():
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=d, num_embeddings=n, feature_names=[f"f{i}"],
                                 pooling=PoolingType.SUM) for i, (n, d) in enumerate(((50, 8), (30, 16), (20, 4)))]
    ebc = EmbeddingBagCollection(tables=tables)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1", "f2"], values=torch.tensor([1, 7, 49, 3, 0, 29, 12, 19, 5, 2]),
        lengths=torch.tensor([2, 1, 1, 2, 2, 2]))
    return ebc, kjt


@pytest.mark.parametrize("dtypes", [{"t0": "int8", "t1": "int4", "t2": "fp16"}, {"t0": "int4", "t1": "fp32", "t2": "int8"}])
def test_fake_quantized_equals_torchrec_quantised_ebc(dtypes):
    ebc, kjt = _ebc()
    ref = ebc(kjt).values().detach().clone()
    served = _served(ebc, dtypes)
    with fake_quantized(ebc, dtypes):
        fake = ebc(kjt).values().detach().clone()
    torch.testing.assert_close(fake, served(kjt).values(), rtol=0, atol=1e-5)  # the 1e-4, with margin
    assert not torch.equal(fake, ref)  # quantisation changed something
    torch.testing.assert_close(ebc(kjt).values(), ref, rtol=0, atol=0)  # restored on exit


def test_fake_quantized_columns_only_and_served_dtypes():
    ebc, kjt = _ebc()
    w = ebc.embedding_bags["t1"].weight
    before = w.detach().clone()
    with fake_quantized(ebc, {"t1": "int4"}, {"t1": [0, 3, 5, 9]}):
        inside = w.detach().clone()
    cols = torch.tensor([0, 3, 5, 9])
    other = torch.tensor([c for c in range(16) if c not in cols.tolist()])
    assert torch.equal(inside[:, other], before[:, other])
    assert not torch.equal(inside[:, cols], before[:, cols])
    assert torch.equal(w.detach(), before)
    entries = [TableDims("a", ["f"], 10, 8, 8, list(range(8)), 0, dtype="int4"),
               TableDims("b", ["g"], 10, 8, 4, list(range(4)), 0, dtype="fp32"),
               TableDims("c", ["h"], 10, 8, 0, [], 0, dtype="int8"), TableDims("d", ["i"], 10, 8, 4, [0, 1, 2, 3], 0)]
    assert served_dtypes(entries) == {"a": "int4"}
    pme = TableDims("t_C1", ["C1"], 10, 8, 8, [], 0, groups=[TokenGroup(8, 3, 0, "int8"), TokenGroup(4, 5, 0),
                                                            TokenGroup(0, 2, 0, "int4")], dtype="int4")
    assert served_dtypes([pme]) == {"t_C1_s8": "int8", "t_C1_s4": "int4"}  # a group without its own dtype: the table's


@pytest.mark.parametrize("section, key", [
    ({"precision": {"dtypes": ["fp32", "int2"]}}, "search.precision.dtypes"),
    ({"precision": {"dtypes": []}}, "search.precision.dtypes"),
    ({"precision": {"signal_budget": 0}}, "search.precision.signal_budget"),
    ({"precision": {"qbits": 4}}, "search.precision.qbits"),
    ({"precision": {"qat_fraction": 1.5}}, "search.precision.qat_fraction"),
    ({"precision": {"check": "yes"}}, "search.precision.check"),
    ({"method": "jointt"}, "search.method"),
])
def test_precision_config_errors_are_one_line_naming_the_key(section, key):
    with pytest.raises(ConfigError) as e:
        from_dict(RunConfig, {"search": section})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(key.split(".", 1)[0]) and key.rsplit(".", 1)[1] in msg


def test_precision_methods_are_search_methods():
    cfg = from_dict(RunConfig, {"search": {"method": "joint", "precision": {"dtypes": ["fp16", "int4"]}}})
    assert cfg.search.precision.dtypes == ["fp16", "int4"]
    for m in ("dims", "precision"):
        assert from_dict(RunConfig, {"search": {"method": m}}).search.method == m


def test_quant_aware_tables_straight_through():
    from types import SimpleNamespace

    from sharded_mde.export.quantize import fake_quantize_table
    from sharded_mde.search.fake_quant import QuantAwareTables

    ebc, _ = _ebc()
    trainer = SimpleNamespace(dmp=ebc, total_steps=10)
    w = ebc.embedding_bags["t1"].weight
    fp32 = ebc.embedding_bags["t0"].weight.detach().clone()
    qat = QuantAwareTables({"t1": "int4", "t0": "fp32"}, fraction=0.3)
    trained = w.detach().clone()
    qat.on_step_end(trainer, 6)  # before the last 30%: nothing
    assert torch.equal(w.detach(), trained)
    qat.on_step_end(trainer, 7)  # from here the table holds Q(W), W = the table as trained
    torch.testing.assert_close(w.detach(), fake_quantize_table(trained, "int4"), rtol=0, atol=0)
    delta = torch.full_like(trained, 0.01)
    with torch.no_grad():
        w.add_(delta)  # what a fused optimizer step does to the table it holds
    state = {k: [t.clone() for t in v] for k, v in qat.state_dict().items()}  # as a checkpoint saves it
    qat.on_step_end(trainer, 8)
    torch.testing.assert_close(qat.shadow[0], trained + delta)  # W takes the update (straight-through)
    torch.testing.assert_close(w.detach(), fake_quantize_table(trained + delta, "int4"), rtol=0, atol=0)
    assert torch.equal(ebc.embedding_bags["t0"].weight.detach(), fp32)  # fp32 tables are left alone
    other = QuantAwareTables({"t1": "int4"}, fraction=0.3)
    other.load_state_dict(state)
    assert torch.equal(other.shadow[0], trained)
