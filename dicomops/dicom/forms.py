"""The forms PS3.5 6.2 gives the values of a VR, as regular expressions shared by the modules that judge them.

Imports nothing from dicomops: de-identification and the PACS results both use it.
"""

from __future__ import annotations

TIME_FRACTION = r"(\.\d{1,6})?"  # the fraction of a second: up to six digits


def time_pattern(separator: str = "") -> str:
    """A TM value (HHMMSS.FFFFFF, every part after the hours optional) as a regular expression.

    Hours 00-23, minutes 00-59, seconds 00-60 (a leap second): a number typed into a time (an MRN
    554433) is not one. `separator` stands between the parts: ``":?"`` also accepts the ACR-NEMA
    form HH:MM:SS that PS3.5 still lets a reader accept.
    """
    return rf"([01]\d|2[0-3])({separator}[0-5]\d({separator}([0-5]\d|60){TIME_FRACTION})?)?"
