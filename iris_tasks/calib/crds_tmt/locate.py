"""TMT file-naming and cache-layout policies for crds (``crds.tmt.locate``).

Names follow the CRDS convention: ``tmt_NNNN.pmap``, ``tmt_iris_NNNN.imap``,
``tmt_iris_<reftype>_NNNN.rmap`` and ``tmt_iris_<reftype>_NNNN.fits``. References live in
``<CRDS_PATH>/references/tmt/iris/``, mappings in ``<CRDS_PATH>/mappings/tmt/``.

Only the functions crds actually calls for local best-reference selection and cache
location are provided; certification (TPN files) is not used by IRIS.
"""

from __future__ import annotations

import os.path
import re
from collections.abc import Mapping
from typing import Any

from crds.core import config, timestamp, utils

from ..reftypes import INSTRUMENT, OBSERVATORY, REFTYPES
from . import INSTRUMENTS

_NAME_RE = re.compile(
    rf"^{OBSERVATORY}(?:_(?P<instrument>[a-z0-9]+))?(?:_(?P<filekind>[a-z0-9\-]+))?"
    r"(?:_(?P<serial>\d+))?(?P<ext>\.(?:pmap|imap|rmap|fits))$"
)


def decompose_newstyle_name(filename: str) -> tuple[str, str, str, str, str, str]:
    """Split ``tmt_iris_dark_0003.fits`` into (path, observatory, instrument, filekind,
    serial, ext); AssertionError if the name is not a TMT CRDS name."""
    path, name = os.path.split(filename)
    match = _NAME_RE.match(name)
    assert match, f"Invalid TMT CRDS filename {filename!r}"
    instrument = match["instrument"] or ""
    filekind = match["filekind"] or ""
    ext = match["ext"]
    if ext == ".pmap":
        assert not instrument and not filekind, f"Invalid .pmap filename {filename!r}"
    elif ext == ".imap":
        assert instrument and not filekind, f"Invalid .imap filename {filename!r}"
    else:
        assert instrument and filekind, f"Invalid filename {filename!r}"
    assert instrument in INSTRUMENTS + [""], f"Invalid instrument in {filename!r}"
    assert filekind in REFTYPES or not filekind, f"Invalid filekind in {filename!r}"
    return path, OBSERVATORY, instrument, filekind, match["serial"] or "", ext


def get_reference_properties(filename: str) -> tuple[str, str, str, str, str, str]:
    """Like decompose_newstyle_name, falling back to the REFTYPE keyword of an existing file."""
    try:
        return decompose_newstyle_name(filename)
    except AssertionError:
        pass
    from astropy.io import fits

    path, name = os.path.split(filename)
    reftype = str(fits.getval(filename, "REFTYPE")).lower()
    root, ext = os.path.splitext(name)
    return path, OBSERVATORY, INSTRUMENT, reftype, root, ext


def get_file_properties(filename: str) -> tuple[str, str]:
    """Return (instrument, filekind) of a mapping or reference file name."""
    return get_reference_properties(filename)[2:4]


def match_context_key(key: str) -> str:
    """Context selector keys (instrument, reftype) are written upper case, as for JWST."""
    return key.upper()


def header_to_reftypes(header: Mapping[str, Any], context: str) -> list[str]:
    """All types apply to every IRIS dataset; [] means 'all' to crds."""
    return []


def fits_to_parkeys(header: Mapping[str, Any]) -> dict[str, Any]:
    """Datasets and rmaps speak the same (FITS keyword) vocabulary: no translation."""
    return dict(header)


def condition_matching_header(rmapping: Any, header: Mapping[str, Any]) -> dict[str, Any]:
    """Normalise header values the way rmap keys are normalised (upper case, N/A, numbers)."""
    return utils.condition_header(header)


def reference_keys_to_dataset_keys(rmapping: Any, header: Mapping[str, Any]) -> dict[str, Any]:
    """A reference's USEAFTER becomes the DATE-OBS/TIME-OBS pair the UseAfter selector uses."""
    result = dict(header)
    if "USEAFTER" in header:
        date, time = timestamp.reformat_date(header["USEAFTER"]).split()
        result["DATE-OBS"], result["TIME-OBS"] = date, time
    return result


def get_all_tpninfos(instrument: str, filekind: str, field: str) -> list:
    """No TPN constraints: IRIS header values are validated by iris_tasks.metadata, and
    rmap Match keys are free strings (new filters need no CRDS software change)."""
    return []


def dnr_check(header: Mapping[str, Any]) -> bool:
    """IRIS has no 'do not reprocess' datasets."""
    return False


def get_env_prefix(instrument: str) -> str:
    return "crds://"


def filekind_to_keyword(filekind: str) -> str:
    """Product headers record references as R_<TYPE> (see ARCHITECTURE.md), not <TYPE>."""
    return "R_" + filekind.upper()[:6]


def locate_dir(instrument: str | None, mode: str | None = None) -> str:
    """Directory of the references of `instrument` (there is only IRIS)."""
    if mode is None:
        mode = config.get_crds_ref_subdir_mode(observatory=OBSERVATORY)
    else:
        config.check_crds_ref_subdir_mode(mode)
    refpath = config.get_crds_refpath(OBSERVATORY)
    if mode == "flat":
        return refpath
    return os.path.join(refpath, (instrument or INSTRUMENT).lower())


def locate_file(refname: str, mode: str | None = None, parameters: Any = None) -> str:
    """Cache path of reference `refname` (any name: IRIS is the only TMT instrument here)."""
    return os.path.join(locate_dir(INSTRUMENT, mode), os.path.basename(refname))
