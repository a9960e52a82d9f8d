"""The ``qtune`` command line: a thin layer over functions a user can call from Python.

One module per command group registers its commands on :data:`app` (:mod:`qtune.cli.common`): data, train,
eval, estimate, study (sweep, report) and serve (generate, chat, serve, export). Problems a user can fix
(QtuneError) print as one line each on stderr and exit with status 2; see :func:`main`
(:mod:`qtune.cli.errors`) for the other ways a command ends.
"""

from qtune.cli import data, estimate, eval, serve, study, train  # noqa: F401 - each registers its commands
from qtune.cli.common import app
from qtune.cli.errors import main

__all__ = ["app", "main"]
