"""IRIS datamodels: stdatamodels DataModel subclasses over the YAML schemas in ``schemas/``.

Files are FITS in JWST conventions: metadata in the primary header, arrays in SCI/ERR/DQ/...
image extensions, and the full tree again in an ASDF extension, so astropy alone can read every
product and stdatamodels restores it losslessly.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from typing import Any

import numpy as np
from stdatamodels import DataModel
from stdatamodels.schema import walk_schema

from ._integration import SCHEMA_URI_PREFIX

log = logging.getLogger(__name__)

# CRDS observatory name under which IRIS reference files are selected (see iris_tasks.calib).
CRDS_OBSERVATORY = "tmt"


class IrisDataModel(DataModel):
    """Base of every IRIS model: CRDS parameters and FITS-keyword views of the metadata."""

    schema_url = SCHEMA_URI_PREFIX + "core.schema"

    @property
    def crds_observatory(self) -> str:
        return CRDS_OBSERVATORY

    def fits_keywords(self) -> dict[str, Any]:
        """Primary-header keyword -> value for every metadata item that is set.

        This is the flat view that CRDS matching, metadata validation and lineage use, so they
        all speak the header vocabulary operators see in the files.
        """
        found: dict[str, Any] = {}

        def callback(subschema, path, combiner, ctx, recurse):
            keyword = subschema.get("fits_keyword") if isinstance(subschema, dict) else None
            if keyword and subschema.get("fits_hdu") in (None, "PRIMARY"):
                node: Any = self._instance
                for part in path:
                    if not isinstance(node, dict) or part not in node:
                        return
                    node = node[part]
                if node is not None and not isinstance(node, dict | list | np.ndarray):
                    found[keyword] = node

        walk_schema(self._schema, callback)
        return found

    def get_crds_parameters(self) -> dict[str, Any]:
        params = self.fits_keywords()
        params.setdefault("INSTRUME", "IRIS")
        return params

    def on_save(self, path=None) -> None:
        super().on_save(path)
        from .. import __version__

        self.meta.calibration_software_version = __version__
        # SOURCE_DATE_EPOCH (reproducible-builds convention) makes whole files byte-identical.
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        now = dt.datetime.fromtimestamp(int(epoch), dt.UTC) if epoch else dt.datetime.now(dt.UTC)
        self.meta.date = now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        self.meta.origin = self.meta.origin or "TMT"
        self.meta.telescope = self.meta.telescope or "TMT"
        if self.meta.instrument.name is None:
            self.meta.instrument.name = "IRIS"


class RampModel(IrisDataModel):
    """Raw reads, uint16 DN, shape (nramps, nreads, ny, nx)."""

    schema_url = SCHEMA_URI_PREFIX + "ramp.schema"

    def read_times(self) -> np.ndarray:
        """Time of each read since reset (s): read i ends at (i + 1) * READTIME."""
        nreads = self.data.shape[1]
        read_time = self.meta.exposure.read_time
        if read_time is None or not read_time > 0:
            raise ValueError(
                f"{self.meta.filename or 'ramp'}: READTIME is missing or not positive "
                f"({read_time!r}); cannot time the reads"
            )
        return (np.arange(nreads, dtype=np.float64) + 1.0) * float(read_time)


class ImageModel(IrisDataModel):
    """Rate (_rate) or calibrated (_cal) image: SCI/ERR/DQ + variance components."""

    schema_url = SCHEMA_URI_PREFIX + "image.schema"


class CubeModel(IrisDataModel):
    """Wavelength-calibrated IFS cube (nwave, ny, nx) with a spectral WCS axis."""

    schema_url = SCHEMA_URI_PREFIX + "cube.schema"


class ReferenceFileModel(IrisDataModel):
    """Base of reference files: REFTYPE/USEAFTER/PEDIGREE are required for CRDS."""

    schema_url = SCHEMA_URI_PREFIX + "referencefile.schema"
    reftype: str = ""

    def on_save(self, path=None) -> None:
        super().on_save(path)
        if self.reftype:
            self.meta.reftype = self.reftype.upper()


class DarkModel(ReferenceFileModel):
    schema_url = SCHEMA_URI_PREFIX + "dark.schema"
    reftype = "dark"


class FlatModel(ReferenceFileModel):
    schema_url = SCHEMA_URI_PREFIX + "flat.schema"
    reftype = "flat"


class MaskModel(ReferenceFileModel):
    schema_url = SCHEMA_URI_PREFIX + "mask.schema"
    reftype = "mask"


class SaturationModel(ReferenceFileModel):
    schema_url = SCHEMA_URI_PREFIX + "saturation.schema"
    reftype = "saturation"


class LinearityModel(ReferenceFileModel):
    schema_url = SCHEMA_URI_PREFIX + "linearity.schema"
    reftype = "linearity"


class ReadnoiseModel(ReferenceFileModel):
    schema_url = SCHEMA_URI_PREFIX + "readnoise.schema"
    reftype = "readnoise"


class GainModel(ReferenceFileModel):
    schema_url = SCHEMA_URI_PREFIX + "gain.schema"
    reftype = "gain"


class IfsTraceModel(ReferenceFileModel):
    """Where each spaxel's spectrum lands on the IFS detector, per wavelength."""

    schema_url = SCHEMA_URI_PREFIX + "ifstrace.schema"
    reftype = "ifstrace"


class TelluricModel(ReferenceFileModel):
    """Response (atmosphere x telescope x instrument) per wavelength, from a standard star."""

    schema_url = SCHEMA_URI_PREFIX + "telluric.schema"
    reftype = "telluric"


class PhotomModel(ReferenceFileModel):
    """Imager zero point (PHOTZP, PHOTMJSR) of one DETECTOR/FILTER, from a standard star.

    No arrays: the numbers are primary-header keywords (the standard's airmass TELAIRM, its
    STDMAG/STDMAGBD, the QA S/N), like a one-row JWST photom table.
    """

    schema_url = SCHEMA_URI_PREFIX + "photom.schema"
    reftype = "photom"


class IpcModel(ReferenceFileModel):
    """Inter-pixel capacitance of one detector: the 3x3 forward kernel (``data[1 + dy, 1 + dx]``
    = fraction of a pixel's charge seen by its neighbour at (dy, dx); sum 1) and its ``err``.

    The readout step deconvolves the slopes with it (``ipc='reference'``); built by
    :func:`iris_tasks.masters.ipc.build_ipc` from isolated single-pixel sources, or written
    from a laboratory kernel by :func:`iris_tasks.masters.ipc.ipc_reference`.
    """

    schema_url = SCHEMA_URI_PREFIX + "ipc.schema"
    reftype = "ipc"


MODEL_CLASSES: dict[str, type[IrisDataModel]] = {
    cls.__name__: cls
    for cls in (
        RampModel, ImageModel, CubeModel, DarkModel, FlatModel, MaskModel, SaturationModel,
        LinearityModel, ReadnoiseModel, GainModel, IfsTraceModel, TelluricModel, PhotomModel,
        IpcModel,
    )
}

REFERENCE_MODELS: dict[str, type[ReferenceFileModel]] = {
    cls.reftype: cls for cls in MODEL_CLASSES.values()
    if issubclass(cls, ReferenceFileModel) and cls.reftype
}
