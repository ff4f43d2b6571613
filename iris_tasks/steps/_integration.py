"""stpipe entry point (``stpipe.steps``): the IRIS steps and pipelines ``strun`` can run by alias.

``strun readout raw.fits`` or, if another installed package uses the same alias,
``strun iris-drs::readout raw.fits``. Class paths are strings so that listing the steps
(``stpipe list``) does not import numpy-heavy modules; tests check the list against the
classes' own ``class_alias``.
"""

__all__ = ["get_steps"]


def get_steps() -> list[tuple[str, str, bool]]:
    """(fully qualified class name, class alias, is a Pipeline) for every IRIS step."""
    return [
        ("iris_tasks.pipelines.Stage1Pipeline", "iris_stage1", True),
        ("iris_tasks.pipelines.Image2Pipeline", "iris_image2", True),
        ("iris_tasks.steps.ReadoutStep", "readout", False),
        ("iris_tasks.steps.DQInitStep", "dq_init", False),
        ("iris_tasks.steps.DarkSubStep", "dark_sub", False),
        ("iris_tasks.steps.FlatFieldStep", "flat_field", False),
        ("iris_tasks.steps.SkySubStep", "sky_sub", False),
        ("iris_tasks.steps.AssignWcsStep", "assign_wcs", False),
        ("iris_tasks.steps.photom_step.PhotomStep", "photom", False),
        ("iris_tasks.ifs.Ifs2Pipeline", "iris_ifs2", True),
        ("iris_tasks.ifs.DestripeStep", "destripe", False),
        ("iris_tasks.ifs.FlexureStep", "flexure", False),
        ("iris_tasks.ifs.ExtractCubeStep", "extract_cube", False),
        ("iris_tasks.ifs.CubeSkySubStep", "cube_sky_sub", False),
        ("iris_tasks.ifs.telluric_step.TelluricStep", "telluric", False),
    ]
