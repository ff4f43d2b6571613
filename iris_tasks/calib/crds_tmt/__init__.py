"""CRDS observatory package for TMT, registered into crds as ``crds.tmt``.

crds finds an observatory's policies by importing ``crds.<observatory>`` (constants below),
``crds.<observatory>.locate`` (file naming and cache layout) and
``crds.<observatory>.<instrument>`` (optional per-type hooks). crds ships packages only for
hst, jwst, roman and tobs, so :func:`iris_tasks.calib.observatory.register` aliases this
package into ``sys.modules`` under those names. Nothing here is imported by its own name
from crds before registration; see docs/calib.md for why this approach was chosen.
"""

from __future__ import annotations

from ..reftypes import INSTRUMENT, OBSERVATORY, REFTYPES, USEAFTER_KEYWORDS

INSTRUMENTS = [INSTRUMENT]
FILEKINDS = sorted(REFTYPES)
EXTENSIONS = [".fits"]
TEXT_DESCR = {name: rt.description for name, rt in REFTYPES.items()}

# No legacy instrument or type synonyms: IRIS has always been IRIS.
INSTRUMENT_FIXERS: dict[str, str] = {}
TYPE_FIXERS: dict[tuple[str, str], str] = {}

PROVENANCE_KEYWORDS = ("DESCRIP", "PEDIGREE", "USEAFTER", "HISTORY", "AUTHOR")
DEFAULT_SELECTORS = ("Match", "UseAfter")

__all__ = [
    "OBSERVATORY",
    "INSTRUMENTS",
    "FILEKINDS",
    "EXTENSIONS",
    "TEXT_DESCR",
    "INSTRUMENT_FIXERS",
    "TYPE_FIXERS",
    "PROVENANCE_KEYWORDS",
    "USEAFTER_KEYWORDS",
    "DEFAULT_SELECTORS",
]
