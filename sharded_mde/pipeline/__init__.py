"""sharded_mde.pipeline: `sharded-mde run`, every stage from data to a served compact model."""
