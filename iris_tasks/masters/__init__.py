"""Nightly master calibration builders (dark, imager flat, IFS lamp flat) over memory-mapped,
chunked combines."""

from .common import MasterBuildError
from .dark import MasterDark, build_master_dark, group_darks, save_master_dark
from .flat import MasterFlat, build_master_flat, group_flats, save_master_flat
from .ifs_flat import MasterIfsFlat, build_master_ifs_flat

__all__ = [
    "MasterBuildError", "MasterDark", "MasterFlat", "MasterIfsFlat", "build_master_dark",
    "build_master_flat", "build_master_ifs_flat", "group_darks", "group_flats", "save_master_dark",
    "save_master_flat",
]
