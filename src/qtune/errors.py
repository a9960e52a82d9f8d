"""The one exception type qtune raises for problems a user can fix (bad file, bad config, bad run directory).

The CLI prints its message as a single line and exits with status 2. Other exceptions reach
:func:`qtune.cli.main`: an OSError (read-only or full disk, permission denied) is one line and status 2 too; a bug in
qtune is one ``error: internal error: ...`` line and status 1, with its traceback under ``QTUNE_DEBUG=1``.
"""


class QtuneError(Exception):
    """A user-facing error whose message names the file, row/line and field at fault and what was expected."""


class QtuneWarning(UserWarning):
    """A setting that works but is known to cause trouble (the CLI prints it as one ``warning:`` line)."""
