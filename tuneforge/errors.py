"""User-facing errors: a one-line message and exit code 2, no traceback unless --debug."""


class UserError(Exception):
    """Bad input from the user (config, data, paths, adapters). The CLI prints `tuneforge: error: <msg>`, exits 2."""

    exit_code = 2
