"""User-facing errors: the CLI turns these into a message and exit status 2."""


class UserError(ValueError):
    """Bad input from the user: the message says what was given, what is wrong, what to do."""
