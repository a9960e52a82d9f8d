"""How a ``qtune`` command ends: :func:`main`, the console entry point, turns every failure into one line.

Problems a user can fix (QtuneError) are printed by the command itself (:func:`qtune.cli.common.fail`); an
operating-system failure names the output it could not write (:func:`writes_to` records the outputs).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import typer

from qtune.cli.common import app

_WRITE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM}
_OUTPUTS: list[Path] = []
"""Where the running command writes (see :func:`writes_to`); main() names it when a write fails."""


def writes_to(*paths) -> None:
    """Record the files or folders the running command writes, so that a failed write that names no file (a full
    disk fails in ``write()``, not ``open()``) or that is not an OSError (torch, safetensors) names one."""
    _OUTPUTS.extend(Path(p) for p in paths if p not in (None, ""))


def _unwritable(path: Path) -> str | None:
    """Why nothing can be written at ``path`` (read-only file system, or under 1 MiB free), else None."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        st = os.statvfs(existing)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if st.f_bavail * st.f_frsize < 2**20:
        return os.strerror(errno.ENOSPC)
    return None


def _os_failure(e: BaseException) -> str | None:
    """One line for an exception that is an operating-system failure (see :func:`main`), else None."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):  # an OSError a library raised "from"
        cause = cause.__cause__
    if isinstance(cause, OSError) and cause.errno is not None:
        # write() on a full disk names no file: name the output that is full (not stdout, say)
        path = cause.filename or next((out for out in _OUTPUTS if _unwritable(out)), None)
        writing = cause.errno in _WRITE_ERRNOS
        what = f"cannot write ({cause.strerror})" if writing else cause.strerror
        return f"{path}: {what}" if path else what
    for out in _OUTPUTS:
        reason = _unwritable(out)
        if reason:
            return f"{out}: cannot write ({reason})"
    if isinstance(cause, OSError):  # no errno: a library's own message (its first line)
        return (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return None


def _internal_error(e: Exception) -> int:
    """Print the one line for an exception that is no usage error and no QtuneError; returns the exit status:
    2 for an operating-system failure (:func:`_os_failure`), 1 for a bug in qtune."""
    message = _os_failure(e)
    if message is not None:
        typer.echo(f"error: {message}", err=True)
        return 2
    first = (str(e).strip().splitlines() or [""])[0][:300]
    typer.echo(
        f"error: internal error: {type(e).__name__}: {first} (a bug in qtune; rerun with QTUNE_DEBUG=1 "
        "for the traceback)",
        err=True,
    )
    return 1


def main() -> None:
    """Console entry point. Every way a command can fail ends in one ``error:`` line on stderr:

    - a command-line usage error (unknown option, value out of range): the message and the command's --help,
      status 2;
    - a problem the user can fix (:class:`QtuneError`, printed by the command itself): status 2;
    - an operating-system error (OSError: read-only file system, disk full, permission denied, ...), or any
      failure while an output of the command lies on a read-only or full file system:
      ``error: PATH: cannot write (reason)``, status 2;
    - Ctrl-C: ``interrupted``, status 130;
    - anything else is a bug in qtune: ``error: internal error: TYPE: MESSAGE (...rerun with QTUNE_DEBUG=1...)``,
      status 1. With the environment variable ``QTUNE_DEBUG=1`` the traceback is shown instead (for a bug and
      for an OSError alike).
    """
    from typer import _click  # the click copy typer parses with; its exceptions are what reach here

    _OUTPUTS.clear()
    debug = os.environ.get("QTUNE_DEBUG", "") not in ("", "0")
    try:
        rv = app(prog_name="qtune", standalone_mode=False)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except _click.exceptions.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `qtune` or `qtune data` alone: show the help
            typer.echo(e.ctx.get_help() if e.ctx else e.format_message())
            sys.exit(0)
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        typer.echo(f"error: {' '.join(e.format_message().split())}{where}", err=True)
        sys.exit(2)
    except _click.exceptions.ClickException as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if debug:
            raise
        sys.exit(_internal_error(e))
    sys.exit(rv if isinstance(rv, int) else 0)
