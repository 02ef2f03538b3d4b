"""The errors a user fixes from their message alone, and how the command line reports them.

An *expected* error is one whose cause lies outside the code: bad settings, missing or damaged
files and data, a refused checkpoint, a full disk, an interrupted run. The command line prints
its message and exits non-zero; the traceback, which adds nothing for the user, is printed only
with ``HYDRA_FULL_ERROR=1``. Any other exception is a defect and keeps Hydra's traceback.

The project's error classes derive from :class:`ExpectedError` (next to the built-in type a
caller may already catch, e.g. ``class ArtifactError(ExpectedError, RuntimeError)``);
:data:`EXPECTED` adds the built-in errors that always name a user's file. Standard library only:
the command line and the lightest modules need it before anything else is imported.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

__all__ = [
    "EXPECTED",
    "ExpectedError",
    "SettingsError",
    "CheckpointRefusedError",
    "UnreadableFileError",
    "DiskFullError",
    "RunInterrupted",
    "expected",
    "report",
]


class ExpectedError(Exception):
    """An error the user fixes from its message (printed without traceback by the CLI).

    Attributes:
        exit_code: The process exit status the command line ends with.
    """

    exit_code = 1


class SettingsError(ExpectedError, ValueError):
    """A setting is out of range or contradicts another one; nothing was run."""


class CheckpointRefusedError(ExpectedError, ValueError):
    """A resume checkpoint is unreadable or was written by a run of another configuration."""


class UnreadableFileError(ExpectedError, ValueError):
    """An input file is damaged, cut short, or not of the kind the setting names."""


class DiskFullError(ExpectedError, OSError):
    """A file could not be written for lack of space; the partial file was removed."""


class RunInterrupted(ExpectedError):
    """The run was stopped by a signal (pre-emption, a scheduler's time limit).

    The exit status is ``128 + signal`` (143 for SIGTERM), the shell's convention for a process
    ended by that signal, so a chained ``... || exit`` stops there.
    """

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


#: Built-in errors that always name a missing or forbidden path of the user's.
EXPECTED: tuple[type[BaseException], ...] = (ExpectedError, FileNotFoundError, PermissionError)


def expected(err: BaseException) -> BaseException | None:
    """The expected error ``err`` stands for, or None when it is a defect.

    Lightning ends a loop that received SIGTERM with ``SIGTERMException``, a ``SystemExit`` whose
    status is 0: it stands for :class:`RunInterrupted`, so the process ends non-zero.
    """
    # Raised only once Lightning is loaded, so its module is looked up, never imported here.
    lightning = sys.modules.get("lightning.pytorch.utilities.exceptions")
    if isinstance(err, SystemExit):
        if lightning is not None and isinstance(err, lightning.SIGTERMException):
            return RunInterrupted(
                "stopped by SIGTERM (pre-emption, a time limit, or the scheduler's warning "
                "signal): the training stage that ran wrote its resume checkpoint; run the same "
                "command with ckpt_path=last to continue"
            )
        return None
    return err if isinstance(err, EXPECTED) else None


def report(known: BaseException, raised: BaseException) -> int:
    """Print an expected error for the user and return the exit status.

    Args:
        known: The expected error (:func:`expected`).
        raised: The exception as raised, whose traceback ``HYDRA_FULL_ERROR=1`` prints.

    Returns:
        The exit status: ``known.exit_code``, else 1.
    """
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    if full:
        traceback.print_exception(raised)
    hint = "" if full else "\n(set HYDRA_FULL_ERROR=1 for the traceback)"
    print(f"Error: {known}{hint}", file=sys.stderr)
    return int(getattr(known, "exit_code", 1))
