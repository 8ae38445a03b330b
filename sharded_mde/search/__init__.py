"""sharded_mde.search"""
