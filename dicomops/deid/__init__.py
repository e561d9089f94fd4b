"""De-identification (PS3.15 Annex E with options), keyed pseudonyms, and the PHI leak scanner."""

from __future__ import annotations

from dicomops.deid.keys import KeyedMapper, load_or_create_key
from dicomops.deid.profile import PROFILE_NAME, PROFILE_TAG, Deidentifier
from dicomops.deid.scan import Hit, scan_for_phi

__all__ = ["PROFILE_NAME", "PROFILE_TAG", "Deidentifier", "Hit", "KeyedMapper", "load_or_create_key", "scan_for_phi"]
