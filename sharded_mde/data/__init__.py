"""Data stage: streaming readers, vocabularies, planted synthetic data, prepared splits and batches."""

from sharded_mde.data.batches import iterate_batches, iterate_eval_batches, num_batches, num_eval_batches
from sharded_mde.data.encode import Encoder, transform_dense
from sharded_mde.data.meta import DatasetMeta
from sharded_mde.data.prepare import prepare
from sharded_mde.data.readers import DataWarning, Schema, SourceReader
from sharded_mde.data.synth import Teacher, generate, load_ground_truth
from sharded_mde.data.vocab import MISSING_ID, NUM_RESERVED, OOV_ID, Vocabulary

__all__ = [
    "DataWarning", "DatasetMeta", "Encoder", "MISSING_ID", "NUM_RESERVED", "OOV_ID", "Schema", "SourceReader",
    "Teacher", "Vocabulary", "generate", "iterate_batches", "iterate_eval_batches",
    "load_ground_truth", "num_batches", "num_eval_batches", "prepare", "transform_dense",
]
