"""The one exception type that entry points turn into a message for a person.

Raise `BanaError` for anything a user can fix (a missing file, a bad config value, a corrupt
image): the message says what was expected, what was found, where, and how to fix it. Entry
scripts print it without a traceback (unless `--debug`) and exit with status 2.
"""


class BanaError(Exception):
    """A problem with the user's input or environment, explained in the message."""
