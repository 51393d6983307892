"""The one error type of the evaluation package."""


class EvalError(Exception):
    """A user-facing problem (missing file, bad layout); the message is one line."""
