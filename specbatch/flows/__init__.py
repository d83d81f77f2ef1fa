"""Prefect flows: plan shards, dispatch them to workers, collect, report."""
