"""Synthetic IRIS data with saved truth: H4RG-10 ramps, imager and IFS scenes, whole nights.

Public API::

    DetectorModel.for_detector(name, size, seed)       # every per-pixel property, reproducible
    simulate_ramp(detector, rate_e_per_s, nreads, read_time, nramps, rng, cosmic_rays)
    make_star_field / StarField
    FrameFactory(size, seed, optics="realistic"|"ideal", flexure=...)   # frames + IFS truth
    build_as_built_ifs / AsBuiltIfs, build_realistic_scene, render, Flexure   # realistic IFS
    build_trace / IfsTrace, build_scene / IfsScene, project_cube      # ideal IFS (unit tests)
    write_reference_files(out_dir, detectors, size, seed, useafter)   # pre-night references
    simulate_night(out_dir, size, nreads, detectors, seed, night)     # -> manifest dict
    simulate_frame(out, obsname, detector, ..., pa=0.0)               # one raw frame
    pixel_to_sky / sky_to_pixel / reference_pixel     # the reduction's TAN/PA convention (sky.py)

See docs/simulate.md for what is modelled, the defaults and the truth layout.
"""

from .detector import (
    DEFAULT_READ_TIME,
    FULL_SIZE,
    NORMAL_APPROX_ELECTRONS,
    REFPIX,
    DetectorModel,
    apply_linearity,
    cosmic_ray_events,
    inverse_series,
    seed_sequence,
    simulate_ramp,
)
from .frames import FrameFactory, FrameSpec, frame_name, ramp_model, write_atomic
from .ifs import (
    IfsScene,
    IfsTrace,
    build_as_built_ifs,
    build_realistic_scene,
    build_scene,
    build_trace,
    project_cube,
)
from .ifs_optics import AsBuiltIfs, Flexure, IfsTruth, SpectralComponent, flexure_at, render
from .night import NightPlan, manifest_files, plan_night, simulate_frame, simulate_night
from .references import reference_name, write_reference_files
from .scenes import StarField, dither_offset, flat_lamp_rate, make_star_field, sky_rate
from .sky import pixel_to_sky, reference_pixel, sky_to_pixel

__all__ = [
    "DEFAULT_READ_TIME", "FULL_SIZE", "NORMAL_APPROX_ELECTRONS", "REFPIX", "AsBuiltIfs",
    "DetectorModel", "Flexure", "FrameFactory", "FrameSpec", "IfsScene", "IfsTrace", "IfsTruth",
    "NightPlan", "SpectralComponent", "StarField", "apply_linearity", "build_as_built_ifs",
    "build_realistic_scene", "build_scene", "build_trace", "cosmic_ray_events", "dither_offset",
    "flat_lamp_rate", "flexure_at", "frame_name", "inverse_series", "make_star_field", "manifest_files",
    "pixel_to_sky", "plan_night", "project_cube", "ramp_model", "reference_name",
    "reference_pixel", "render", "seed_sequence", "sky_to_pixel",
    "simulate_frame", "simulate_night", "simulate_ramp", "sky_rate", "write_atomic",
    "write_reference_files",
]
