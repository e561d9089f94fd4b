"""Thin Prefect tasks over dicomops: one library call each, plus loading and saving."""
