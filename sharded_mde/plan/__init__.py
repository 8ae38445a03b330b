"""sharded_mde.plan"""
