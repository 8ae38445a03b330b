"""sharded_mde.modules"""
