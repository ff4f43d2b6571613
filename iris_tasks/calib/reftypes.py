"""The IRIS reference types CRDS selects, and the header keywords each one is matched on.

This table is the single source of truth: the CRDS observatory plugin (``crds_tmt``), the
bootstrap cache and the publisher all read it. Adding a reference type (e.g. a new IFS type)
is one row here; the next ``configure()`` or ``publish_references()`` gives it an (empty)
rmap in the next context.
"""

from __future__ import annotations

from dataclasses import dataclass

OBSERVATORY = "tmt"
INSTRUMENT = "iris"

# Every rmap nests Match (on ``parkeys``) over UseAfter (on the exposure start).
USEAFTER_KEYWORDS = ("DATE-OBS", "TIME-OBS")


@dataclass(frozen=True)
class RefType:
    """One CRDS reference type: lowercase name, Match keywords, one-line description."""

    name: str
    parkeys: tuple[str, ...]
    description: str


REFTYPES: dict[str, RefType] = {
    rt.name: rt
    for rt in (
        RefType("mask", ("DETECTOR",), "Bad-pixel mask (DQ flags)"),
        RefType("saturation", ("DETECTOR",), "Saturation level per pixel (DN)"),
        RefType("linearity", ("DETECTOR",), "Classical non-linearity polynomial"),
        RefType("readnoise", ("DETECTOR",), "Read noise per read (DN)"),
        RefType("gain", ("DETECTOR",), "Gain (e-/DN)"),
        RefType("dark", ("DETECTOR", "READPATT"), "Dark current per read pattern"),
        # Imager flats carry IFSMODE='N/A' (matches any dataset IFSMODE); IFS flats carry
        # LENSLET or SLICER. DETECTOR keeps the two families apart.
        RefType("flat", ("DETECTOR", "FILTER", "IFSMODE"), "Pixel flat field"),
        # IFS types: the spectral trace depends on mode, plate scale and filter (grating).
        RefType(
            "ifstrace",
            ("DETECTOR", "IFSMODE", "IFSSCALE", "FILTER"),
            "IFS instrument model: spaxel spectrum positions on the detector",
        ),
        # One per standard star: USEAFTER is the standard's exposure start, so CRDS serves the
        # latest standard before a science frame (the telluric step can also choose among
        # several by time and airmass).
        RefType(
            "telluric",
            ("DETECTOR", "IFSMODE", "IFSSCALE", "FILTER"),
            "IFS spectral response (atmosphere x instrument) from a telluric standard",
        ),
        # Imager zero point: one per standard star (IMG1-TEL), USEAFTER its exposure start (the
        # night's first from the night's start), like telluric.
        RefType("photom", ("DETECTOR", "FILTER"),
                "Imager photometric zero point (PHOTZP, PHOTMJSR) from a standard star"),
        # Inter-pixel capacitance: one 3x3 kernel per detector (the readout step deconvolves
        # the slopes with it when asked: ipc='reference').
        RefType("ipc", ("DETECTOR",), "Inter-pixel capacitance 3x3 kernel"),
    )
}

# Reference header values meaning "applies to any value of this keyword". They go into the
# rmap as CRDS's don't-care 'N/A', which matches with lower weight than an exact value: a
# reference for FILTER='Kbb' beats one for FILTER='N/A' when the dataset has FILTER='Kbb'.
ANY_VALUES = frozenset({"N/A", "ANY", "*", "NOT APPLICABLE"})


def get_reftype(name: str) -> RefType:
    """Return the table row for `name` (case-insensitive); KeyError names the known types."""
    try:
        return REFTYPES[name.lower()]
    except KeyError:
        raise KeyError(
            f"unknown IRIS reference type {name!r}; known: {', '.join(sorted(REFTYPES))}"
        ) from None
