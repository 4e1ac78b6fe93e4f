"""The package's one error type for mistakes a user can fix."""


class HpsearchError(Exception):
    """A user-facing error: the message is one line that names what is wrong and how to fix it."""
