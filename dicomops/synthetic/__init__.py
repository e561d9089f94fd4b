"""Multi-vendor synthetic CT corpus: phantoms, vendor profiles, PHI, faults and drift scenarios.

The public names load on first use, so importing :mod:`dicomops.synthetic.sidecars` (which the
config and the ingest gate do) does not import the generator itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicomops.synthetic.corpus import (
        CorpusSummary,
        SeriesPlan,
        corpus_digest,
        generate_corpus,
        plan_corpus,
        render_series,
        write_series,
    )
    from dicomops.synthetic.vendors import ALL_VENDORS, UNSEEN_VENDOR, VENDORS, VendorProfile

_SOURCES = {
    "CorpusSummary": "corpus", "SeriesPlan": "corpus", "corpus_digest": "corpus",
    "generate_corpus": "corpus", "plan_corpus": "corpus", "render_series": "corpus",
    "write_series": "corpus",
    "ALL_VENDORS": "vendors", "UNSEEN_VENDOR": "vendors", "VENDORS": "vendors", "VendorProfile": "vendors",
}

__all__ = ["ALL_VENDORS", "UNSEEN_VENDOR", "VENDORS", "CorpusSummary", "SeriesPlan", "VendorProfile",
           "corpus_digest", "generate_corpus", "plan_corpus", "render_series", "write_series"]


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{source}"), name)
    globals()[name] = value
    return value
