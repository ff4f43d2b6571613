"""Local service helpers (development servers started and stopped by tests and demos).

``from iris_devstack.services import SeaweedS3`` works; the submodule is imported lazily so that
``python -m iris_devstack.services.seaweedfs`` does not import itself twice.
"""

from typing import Any

__all__ = ["SeaweedError", "SeaweedS3", "find_weed"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import seaweedfs

        return getattr(seaweedfs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
