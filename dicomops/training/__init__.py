"""Training: cross-validation splits (``splits``), metrics (``metrics``); the model, loop and
flow arrive with the training issue's remaining parts."""
