"""Errors of the model cache, placed in the platform's hierarchy (llmos.errors)."""

from __future__ import annotations

from llmos.errors import FailedPrecondition, LlmosError


class ModelSourceMissing(FailedPrecondition):
    """The pip package that carries a model's weights is not installed (or is damaged)."""


class ModelsNotBuilt(FailedPrecondition):
    """An artefact a service needs has not been built (or is damaged)."""


class BuildFailed(LlmosError):
    """Building an artefact failed, or the built artefact did not pass its checks."""
