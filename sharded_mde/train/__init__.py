"""sharded_mde.train"""
