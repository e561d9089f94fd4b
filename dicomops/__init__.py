"""dicomops: orchestrated MLOps for CT imaging.

The library holds all the logic and never imports Prefect; ``tasks/`` and ``flows/`` wire it.
"""

from __future__ import annotations

__version__ = "0.1.0"
