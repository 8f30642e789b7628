"""The one exception type lowbit raises for problems a user can fix.

The CLI prints such an error as a single line and exits non-zero; library users can catch it.
"""


class LowbitError(Exception):
    """A problem with the user's input (files, options, data), stated in one line."""
