"""Prefect flows, one per file; these are the deployment entrypoints in prefect.yaml."""
