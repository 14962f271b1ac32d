"""User-facing errors: a one-line message and exit code 2, no traceback unless --debug; the first line of an error."""


class UserError(Exception):
    """Bad input from the user (config, data, paths, adapters). The CLI prints `tuneforge: error: <msg>`, exits 2."""

    exit_code = 2

    def __init__(self, message: str):
        # One line, always: a value quoted from the user's input may itself contain newlines.
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class TrainingAborted(UserError):
    """Training cannot usefully go on (e.g. the loss keeps diverging); exit code 3, the last checkpoint is intact."""

    exit_code = 3


def first_line(exc: BaseException) -> str:
    """The first non-empty line of the exception's message, for a one-line error naming its cause; the exception's
    class name when the message is empty (str(KeyError()) is '')."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return exc.__class__.__name__
