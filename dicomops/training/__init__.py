"""Training: cross-validation splits (``splits``), slab data (``data``), the MONAI model
(``model``), the loop with checkpoints (``loop``), metrics (``metrics``), pictures (``plots``) and
the cross-validation over a work directory (``cv``)."""
