"""Drift monitoring: the same features for the training data (reference, stored with the model
version) and for each new batch, compared with Evidently; the decision, the alert, and the guard
that keeps alert-driven retraining from storming."""
