"""The one exception type users see."""


class WinaError(Exception):
    """A failure caused by the user's input or environment.

    The message says what was wrong and what to do; the CLI prints it on one line and exits
    non-zero (tracebacks only with ``--debug``).
    """
