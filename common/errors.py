"""The one exception type for a user's mistake: printed as one line, never a traceback."""


class UserError(Exception):
    """Bad input from a person (config, data, flags, files): the message says what and how to fix."""
