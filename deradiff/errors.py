"""The one exception type for bad user input."""


class UserError(ValueError):
    """Bad input, detected before expensive work. The CLI prints it as one line (no traceback)
    and exits with status 2; the message names the problem and the fix."""
