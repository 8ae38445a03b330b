"""sharded_mde.export"""
