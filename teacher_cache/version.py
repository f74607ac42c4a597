"""The distill version a cache's manifest and a trained student's training record carry."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def distill_version() -> str | None:
    """The installed distribution's version; None from a source tree that was never installed."""
    try:
        return version("distill")
    except PackageNotFoundError:
        return None
