"""Multi-vendor synthetic CT corpus: phantoms, vendor profiles, PHI, faults and drift scenarios."""

from __future__ import annotations

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

__all__ = ["ALL_VENDORS", "UNSEEN_VENDOR", "VENDORS", "CorpusSummary", "SeriesPlan", "VendorProfile",
           "corpus_digest", "generate_corpus", "plan_corpus", "render_series", "write_series"]
