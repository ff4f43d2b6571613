"""Best-reference selection for a dataset header, through crds' own rules engine."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import crds
from crds.core import heavy_client

from . import cache
from .errors import CorruptFileError, ReferenceMissingError, WrongReftypeError
from .reftypes import INSTRUMENT, OBSERVATORY, USEAFTER_KEYWORDS, get_reftype

log = logging.getLogger(__name__)


def dataset_parameters(header: Mapping[str, Any]) -> dict[str, Any]:
    """The crds matching parameters of a dataset header (a dict, astropy Header, or the
    result of ``DataModel.get_crds_parameters()``).

    Keys are upper-cased, non-scalar values dropped, INSTRUME defaults to IRIS, and an ISO
    ``DATE-OBS='2025-03-01T04:05:06'`` without TIME-OBS is split into the pair UseAfter needs.
    """
    params: dict[str, Any] = {}
    for key, value in header.items():
        if isinstance(value, bool | int | float | str):
            params[str(key).upper()] = value.strip() if isinstance(value, str) else value
    params.setdefault("INSTRUME", INSTRUMENT.upper())
    date = params.get("DATE-OBS")
    if isinstance(date, str) and "T" in date and "TIME-OBS" not in params:
        params["DATE-OBS"], params["TIME-OBS"] = date.split("T", 1)
    return params


def _normalise_reftypes(reftypes: str | Iterable[str]) -> list[str]:
    if isinstance(reftypes, str):
        reftypes = [reftypes]
    names = []
    for name in reftypes:
        try:
            names.append(get_reftype(name).name)
        except KeyError as exc:
            raise ReferenceMissingError(str(exc.args[0])) from None
    return names


def _describe(params: Mapping[str, Any], keywords: Iterable[str]) -> str:
    return " ".join(f"{k}={params.get(k, 'UNDEFINED')!r}" for k in keywords)


def recommendations(
    header: Mapping[str, Any], reftypes: str | Iterable[str], context: str | None = None
) -> tuple[str, dict[str, str]]:
    """(context, {reftype: reference basename}) without touching the reference files.

    Raises ReferenceMissingError naming the header values and the rmap when a type has no
    matching rule, CorruptFileError when a mapping fails its checksum.
    """
    ctx = cache.resolve_context(context)
    params = dataset_parameters(header)
    names = _normalise_reftypes(reftypes)
    # Load (and checksum) every mapping involved first: crds would otherwise turn a corrupt
    # rmap into an anonymous "NOT FOUND" string.
    rmaps = {name: cache.get_rmap(ctx, name) for name in names}
    bestrefs = heavy_client.getrecommendations(
        params, reftypes=names, context=ctx, observatory=OBSERVATORY
    )
    result = {}
    for name in names:
        chosen = str(bestrefs.get(name, "NOT FOUND (no result)"))
        if chosen.upper().startswith("NOT FOUND"):
            keys = (*get_reftype(name).parkeys, *USEAFTER_KEYWORDS)
            reason = chosen[len("NOT FOUND"):].strip() or "no match"
            raise ReferenceMissingError(
                f"no {name} reference for {_describe(params, keys)} in "
                f"{rmaps[name].basename} (context {ctx}): {reason}"
            )
        result[name] = chosen
    return ctx, result


def get_references(
    header: Mapping[str, Any], reftypes: str | Iterable[str], context: str | None = None
) -> dict[str, str]:
    """Best reference file path of each of `reftypes` for dataset `header`.

    `context` None means the operational context (see :func:`cache.operational_context`);
    an explicit context name reproduces the selection made under that context. Each file is
    checked to exist, to be readable FITS and to carry the requested REFTYPE.
    """
    ctx, chosen = recommendations(header, reftypes, context)
    paths = {}
    for reftype, name in chosen.items():
        path = crds.locate_file(name, OBSERVATORY)
        check_reference(path, reftype, selected_by=ctx)
        paths[reftype] = path
    log.debug("references under %s: %s", ctx, paths)
    return paths


def get_reference(header: Mapping[str, Any], reftype: str, context: str | None = None) -> str:
    """Path of the best `reftype` reference for `header` (see :func:`get_references`)."""
    return get_references(header, [reftype], context)[get_reftype(reftype).name]


def check_reference(path: str | os.PathLike[str], reftype: str, selected_by: str | None = None) -> str:
    """Check that `path` exists, is readable FITS and has REFTYPE == `reftype`.

    Use it on user-supplied override files too. Returns the path as a string.
    """
    from astropy.io import fits

    path = os.fspath(path)
    where = f" (selected by {selected_by})" if selected_by else ""
    if not os.path.isfile(path):
        raise ReferenceMissingError(f"{path}: {reftype} reference file is missing{where}")
    try:
        found = fits.getval(path, "REFTYPE", ext=0)
    except KeyError:
        raise WrongReftypeError(f"{path}: no REFTYPE keyword; expected REFTYPE={reftype.upper()}{where}") from None
    except Exception as exc:  # astropy raises OSError/ValueError/TypeError on damaged files
        raise CorruptFileError(f"{path}: unreadable FITS reference{where}: {exc}") from exc
    if str(found).strip().lower() != reftype.lower():
        raise WrongReftypeError(
            f"{path}: REFTYPE={str(found).strip()!r} but a {reftype!r} reference was expected{where}"
        )
    return path


def references_changed(
    header: Mapping[str, Any],
    old_context: str,
    new_context: str,
    reftypes: str | Iterable[str],
) -> dict[str, tuple[str | None, str | None]]:
    """What selection changes for this dataset between two contexts.

    Returns {reftype: (old reference or None, new reference or None)} for every type whose
    best reference differs (None = no match under that context); empty if nothing changed.
    The reprocessing DAG calls this per science frame.
    """
    names = _normalise_reftypes(reftypes)
    before = _best_or_none(header, names, old_context)
    after = _best_or_none(header, names, new_context)
    return {n: (before[n], after[n]) for n in names if before[n] != after[n]}


def _best_or_none(header: Mapping[str, Any], names: list[str], context: str) -> dict[str, str | None]:
    result: dict[str, str | None] = {}
    for name in names:
        try:
            result[name] = recommendations(header, [name], context)[1][name]
        except ReferenceMissingError:
            result[name] = None
    return result
