"""IRIS DRS science and I/O library: datamodels, metadata, steps, pipelines, calibration,
storage, lineage, quicklook and the synthetic-data simulator."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("iris-drs")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
