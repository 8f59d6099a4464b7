"""The one exception type for user mistakes: the scripts print its message on one line, no traceback."""


class LvaaError(Exception):
    """Bad input from the user (a file, a flag, a config value): the message says what and where."""
