"""The one exception type qtune raises for problems a user can fix (bad file, bad config, bad run directory).

The CLI prints its message as a single line and exits with status 2; nothing else is caught there, so a bug in
qtune still shows its traceback.
"""


class QtuneError(Exception):
    """A user-facing error whose message names the file, row/line and field at fault and what was expected."""


class QtuneWarning(UserWarning):
    """A setting that works but is known to cause trouble (the CLI prints it as one ``warning:`` line)."""
