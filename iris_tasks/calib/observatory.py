"""Register the TMT observatory with crds (``crds.tmt`` and friends).

crds hard-codes its observatory list (``crds.core.constants.ALL_OBSERVATORIES``) and finds
each observatory's policies by importing ``crds.<obs>``, ``crds.<obs>.locate`` and
``crds.<obs>.<instrument>``. :func:`register` appends "tmt" to that list (the same list
object every crds module imported, so all of them see it) and aliases the modules of
:mod:`iris_tasks.calib.crds_tmt` under those names. It is idempotent and runs when
:mod:`iris_tasks.calib` is imported.
"""

from __future__ import annotations

import logging
import sys

import crds
from crds.core import constants, utils

from . import crds_tmt
from .crds_tmt import iris as _iris_hooks
from .crds_tmt import locate as _locate
from .reftypes import INSTRUMENT, OBSERVATORY

log = logging.getLogger(__name__)

_MODULES = {
    f"crds.{OBSERVATORY}": crds_tmt,
    f"crds.{OBSERVATORY}.locate": _locate,
    f"crds.{OBSERVATORY}.{INSTRUMENT}": _iris_hooks,
}


def register() -> None:
    """Make ``observatory="tmt"`` usable everywhere in crds (idempotent)."""
    changed = False
    for name, module in _MODULES.items():
        if sys.modules.get(name) is not module:
            sys.modules[name] = module
            changed = True
    if getattr(crds, OBSERVATORY, None) is not crds_tmt:
        setattr(crds, OBSERVATORY, crds_tmt)
        changed = True
    if OBSERVATORY not in constants.ALL_OBSERVATORIES:
        constants.ALL_OBSERVATORIES.append(OBSERVATORY)
        changed = True
    if changed:
        # crds memoises observatory/instrument lookups; forget answers computed without tmt.
        utils.clear_function_caches()
        log.debug("registered CRDS observatory %r", OBSERVATORY)
