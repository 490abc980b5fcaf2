"""One error type for everything the user can fix: the CLI prints it on one line and exits 2."""

from __future__ import annotations


class OptkitError(Exception):
    """A problem with the user's input (recipe, data, endpoint, environment) — not a bug in optkit."""


class MissingExtraError(OptkitError):
    """An optional dependency is needed for what the recipe asks."""

    def __init__(self, what: str, package: str, extra: str | None = None):
        how = f"pip install 'optkit[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{what} needs the package '{package}', which is not installed: {how}")
