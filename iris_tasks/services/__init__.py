"""Local service helpers (development servers started and stopped by tests and demos)."""

from .seaweedfs import SeaweedError, SeaweedS3, find_weed

__all__ = ["SeaweedError", "SeaweedS3", "find_weed"]
