"""Distributed test helpers: a body on N gloo ranks, random batches, a sharded model beside its unsharded reference."""

from __future__ import annotations

import copy
import os
import traceback
import warnings
from typing import Any, Callable, Iterator, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.optim import RowWiseAdagrad

from sharded_mde.config import TrainConfig
from sharded_mde.plan.sharding import manual_plan
from sharded_mde.train.state import copy_full_into
from sharded_mde.train.distributed import free_port, shutdown_distributed
from sharded_mde.train.sharding import ebc_path, make_optimizer, wrap_model

Spec = Sequence[Tuple[str, int, int]]  # (feature, rows, dim) of each test table


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, errors: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    finished = False
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
        finished = True
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        shutdown_distributed(wait_for_peers=finished)  # both ranks done before either tears gloo down


RUNTIME_ABORT = "terminated with signal SIGABRT"

# Every retried abort of this pytest process, "test body: error": conftest.py reports them in the
# terminal summary, so a crash that a retry hid is still seen in every test run.
RETRIED_ABORTS: List[str] = []


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> None:
    """Calls `fn(rank, world_size, *args)` on `world_size` gloo ranks; re-raises the first failure.

    One retry where a rank died by SIGABRT without a Python error: torch's gloo runtime on this
    stack now and then calls std::terminate ("terminate called without an active exception") with
    no exception of ours in flight (about 1 run in 20 of a 2-rank test on the 2-core CI machine).
    Each retry is recorded in RETRIED_ABORTS and listed in the pytest summary. A Python error in a
    rank is never retried, and a second abort fails.
    """
    for attempt in range(2):
        ctx = mp.get_context("spawn")
        errors = ctx.SimpleQueue()
        try:
            mp.start_processes(_worker, args=(world_size, free_port(), fn, args, errors), nprocs=world_size,
                               join=True, start_method="spawn")
            return
        except Exception as e:
            if errors.empty() and RUNTIME_ABORT in str(e) and attempt == 0:
                RETRIED_ABORTS.append(f"{getattr(fn, '__qualname__', fn)}: {e}")
                warnings.warn(f"run_ranks: {e} with no Python error (a gloo runtime abort); running once more")
                continue
            detail = errors.get() if not errors.empty() else str(e)
            raise AssertionError(detail) from None


def table_configs(spec: Spec) -> List[EmbeddingBagConfig]:
    """One table `t_<feature>` per (feature, rows, dim) of `spec`: the small tables the tests shard."""
    return [EmbeddingBagConfig(name=f"t_{f}", num_embeddings=r, embedding_dim=d, feature_names=[f]) for f, r, d in spec]


def random_batch(spec: Spec, batch_size: int, n_dense: int, seed: int, max_bag: int = 2, seen: float = 1.0) -> Batch:
    """A batch drawn from `seed` alone: bags of 0..max_bag ids among each table's first `seen` share of rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_bag + 1, (len(spec) * batch_size,), generator=g, dtype=torch.int32)
    values = torch.cat([torch.randint(0, int(r * seen), (int(lengths[i * batch_size:(i + 1) * batch_size].sum()),),
                                      generator=g) for i, (_, r, _) in enumerate(spec)])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f for f, _, _ in spec], values=values, lengths=lengths)
    return Batch(dense_features=torch.randn(batch_size, n_dense, generator=g), sparse_features=kjt,
                 labels=torch.randint(0, 2, (batch_size,), generator=g).float())


def shard_with_reference(model: nn.Module, tables: Sequence[EmbeddingBagConfig], kind: str, world: int,
                         tcfg: TrainConfig) -> Tuple[DistributedModelParallel, nn.Module]:
    """(`model` under DMP with every table sharded `kind`, an unsharded copy holding the same weights)."""
    ref = copy.deepcopy(model)
    dmp = wrap_model(model, manual_plan(tables, kind, world, module_fqn=ebc_path(model)), tcfg, torch.device("cpu"))
    copy_full_into(dmp.state_dict(), ref.state_dict())
    return dmp, ref


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch) -> torch.Tensor:
    """One optimizer step of a RecTrain-style model (returns (loss, ...)) on `batch`; returns the loss."""
    loss, _ = model(batch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def reference_optimizers(ref: nn.Module, tcfg: TrainConfig) -> List[torch.optim.Optimizer]:
    """Unsharded optimizers doing what make_optimizer's fused (row-wise) Adagrad and dense Adam do."""
    if tcfg.embedding_optimizer not in ("adagrad", "rowwise_adagrad") or tcfg.dense_optimizer != "adam":
        raise ValueError(f"no reference optimizer for {tcfg.embedding_optimizer}/{tcfg.dense_optimizer}")
    emb = [p for n, p in ref.named_parameters() if "embedding_bags" in n]
    dense = [p for n, p in ref.named_parameters() if "embedding_bags" not in n]
    table = RowWiseAdagrad if tcfg.embedding_optimizer == "rowwise_adagrad" else torch.optim.Adagrad
    return [table(emb, lr=tcfg.embedding_lr, eps=1e-8), torch.optim.Adam(dense, lr=tcfg.dense_lr)]


def reference_step(ref: nn.Module, ref_opts: List[torch.optim.Optimizer], batch: Callable[[int, int], Batch],
                   step: int, world: int) -> torch.Tensor:
    """One step of the unsharded reference on the mean loss of every rank's batch `batch(r, step)`; returns it."""
    ref_loss = sum(ref(batch(r, step))[0] for r in range(world)) / world
    for o in ref_opts:
        o.zero_grad()
    ref_loss.backward()
    for o in ref_opts:
        o.step()
    return ref_loss


def train_in_lockstep(dmp: DistributedModelParallel, ref: nn.Module, tcfg: TrainConfig,
                      batch: Callable[[int, int], Batch], rank: int, world: int, steps: int) -> Iterator[int]:
    """Trains `dmp` on `batch(rank, step)` and `ref` on the mean loss of every rank's batch, yielding each step.

    Asserts after every step that the ranks' mean loss equals the reference loss (rtol 1e-5, atol 1e-6).
    """
    opt, ref_opts = make_optimizer(dmp, tcfg), reference_optimizers(ref, tcfg)
    for step in range(steps):
        mean_loss = train_step(dmp, opt, batch(rank, step)).detach().clone()
        ref_loss = reference_step(ref, ref_opts, batch, step, world)
        dist.all_reduce(mean_loss)
        mean_loss /= world
        assert torch.allclose(mean_loss, ref_loss.detach(), rtol=1e-5, atol=1e-6), (step, mean_loss, ref_loss)
        yield step
