"""The one exception type the CLI turns into a clear line and exit code 2."""


class EdgeVitError(Exception):
    """A user error: bad input, a missing file, an incompatible artifact.

    The message is shown to the user as a single line, so it should say what is wrong and, where it
    helps, what to do about it.
    """
