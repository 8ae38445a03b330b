"""sharded_mde: find how many embedding columns each field needs, then plan, shard and export compact tables."""

__version__ = "0.1.0"
