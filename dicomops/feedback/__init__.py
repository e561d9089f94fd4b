"""Readers' feedback on the model's results, and what the platform releases about its data.

``privacy``: counts released to people under differential privacy (OpenDP) with a per-dataset ledger.
"""
