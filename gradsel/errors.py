"""The one error class gradsel raises for bad input."""

__all__ = ["GradselError"]


class GradselError(ValueError):
    """Bad input or a state gradsel cannot work with.

    The message says what was wrong, what was expected and what to do about it.
    """
