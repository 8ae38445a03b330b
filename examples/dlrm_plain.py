"""A plain TorchRec DLRM training script: DistributedModelParallel + TrainPipelineSparseDist.

The reference for examples/dlrm_search.py, which is this script with the dimension search added
in a few lines marked `# sharded_mde` (`diff examples/dlrm_plain.py examples/dlrm_search.py`).
Random data (TorchRec's RandomRecDataset); one process, or N with
`torchrun --standalone --nproc_per_node N examples/dlrm_plain.py`.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.random import RandomRecDataset
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim import RowWiseAdagrad, apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_features", type=int, default=4)
    parser.add_argument("--num_embeddings", type=int, default=1000)
    parser.add_argument("--embedding_dim", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun sets them
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    device = torch.device("cpu")
    torch.manual_seed(0)

    features = [f"C{i}" for i in range(args.num_features)]
    tables = [EmbeddingBagConfig(name=f"t_{f}", num_embeddings=args.num_embeddings,
                                 embedding_dim=args.embedding_dim, feature_names=[f]) for f in features]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    model = DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=8,
                           dense_arch_layer_sizes=[32, args.embedding_dim], over_arch_layer_sizes=[32, 1],
                           dense_device=device))
    apply_optimizer_in_backward(RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": 0.05})
    dmp = DistributedModelParallel(model, device=device)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adam(params, lr=1e-3))
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device)

    data = RandomRecDataset(keys=features, batch_size=args.batch_size, hash_size=args.num_embeddings,
                            ids_per_feature=2, num_dense=8, manual_seed=dist.get_rank(), num_batches=args.steps)
    batches = iter(data)
    for step in range(args.steps):
        loss = pipeline.progress(batches)[0]  # (loss, logits, labels) of the step
        if step % 20 == 0 and dist.get_rank() == 0:
            print(f"step {step}: loss {float(loss):.4f}")

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
