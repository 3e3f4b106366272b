"""What every ``shoal`` command prints through: the consoles, exit codes and the one error line."""

from __future__ import annotations

from rich.console import Console

# Lines are never cut to the console's width (80 columns when it is a pipe or a log file):
# a run directory or checkpoint path must stay whole to be copied.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def fail(message: str, code: int = EXIT_FAIL) -> int:
    """Print ``error: message`` on stderr; returns ``code`` for the command to exit with."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return code


def message(e: BaseException) -> str:
    """One line for an error: an OS error on a path says which path and what to do."""
    if isinstance(e, OSError) and e.filename is not None:
        reason = e.strerror or type(e).__name__
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            reason = "a file stands where a directory is needed"
        return f"'{e.filename}': {reason}; give a path you can write (or that exists, for inputs)"
    return str(e)
