"""Per-type CRDS hooks for IRIS (``crds.tmt.iris``).

crds looks here for optional functions named ``precondition_header_iris_<type>_v1`` and
``fallback_header_iris_<type>_v1`` when it loads an rmap. IRIS needs none: every rule is a
plain Match on header values plus a UseAfter on DATE-OBS/TIME-OBS, visible in the rmap.
The module must still exist because crds imports it for every rmap.
"""
