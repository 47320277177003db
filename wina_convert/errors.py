"""The one exception type users see, and how any exception becomes one line of text."""


class WinaError(Exception):
    """A failure caused by the user's input or environment.

    The message says what was wrong and what to do; the CLI prints it on one line and exits
    non-zero (tracebacks only with ``--debug``).
    """


def one_line(e: BaseException | str) -> str:
    """``e``'s text with every run of whitespace (newlines too) made one space; the type name if empty."""
    if isinstance(e, BaseException):
        return " ".join(str(e).split()) or type(e).__name__
    return " ".join(e.split())
