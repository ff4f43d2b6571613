"""Nightly master calibration builders (dark, flat) over memory-mapped, chunked combines."""

from .common import MasterBuildError
from .dark import MasterDark, build_master_dark, group_darks, save_master_dark
from .flat import MasterFlat, build_master_flat, group_flats, save_master_flat

__all__ = [
    "MasterBuildError", "MasterDark", "MasterFlat", "build_master_dark", "build_master_flat",
    "group_darks", "group_flats", "save_master_dark", "save_master_flat",
]
