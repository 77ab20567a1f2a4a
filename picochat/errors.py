"""One exception type for mistakes a user can fix.

The CLI prints these as a single line (``error: ...``) instead of a traceback, so every message
must say what is wrong *and* what to do about it.
"""


class PicochatError(Exception):
    """A problem with the user's input or environment, explained in one line."""
