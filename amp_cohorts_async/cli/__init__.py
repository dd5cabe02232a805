"""amp-cohorts, the command line (also ``python -m amp_cohorts_async``)."""

from ._main import main

__all__ = ("main",)
