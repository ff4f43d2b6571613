"""IRIS pipelines (stpipe) and the frame-level recipe functions the CLI and DAGs call."""

from .image2 import Image2Pipeline
from .stage1 import Stage1Pipeline

__all__ = ["Image2Pipeline", "Stage1Pipeline"]
