"""Progress of long work for the people watching it: the one logger whose records the flows send
to the Prefect run's log (the console and the UI).

Only what is written through :data:`PROGRESS` leaves the process for Prefect's database, so every
message here carries counts, epochs, losses, rates and metric values only: never a name, an
identifier, a date, a path or a header value (the flows' leak tests scan Prefect's database).
The rest of the library logs through its own module loggers, which stay in the process's console.
"""

from __future__ import annotations

import logging

PROGRESS = logging.getLogger("dicomops.progress")


def epoch(label: str, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
    """One line per training epoch: ``fold 0: epoch 3/24, loss 0.412, 41 samples/s[, slice AUC 0.871]``."""
    parts = [f"{label}: epoch {epoch}/{epochs}"]
    if "train_loss" in metrics:
        parts.append(f"loss {metrics['train_loss']:.3f}")
    if "samples_per_second" in metrics:
        parts.append(f"{metrics['samples_per_second']:.0f} samples/s")
    if "val_slice_auc" in metrics:
        parts.append(f"slice AUC {metrics['val_slice_auc']:.3f}")
    PROGRESS.info(", ".join(parts))
