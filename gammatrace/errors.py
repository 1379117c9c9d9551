"""One hierarchy for every error a user can fix: a bad config, a missing or damaged file,
a busy run folder, a full disk. The command line prints such an error as one line and
exits with status 2 (``gammatrace.cli.main`` catches :class:`UserError` alone); anything
else is a bug: it keeps its traceback, exits 1 and says where to report it.

Errors defined beside their code derive from :class:`UserError` too, and keep the
built-in base their callers catch (``StudyError(UserError, ValueError)``,
``ProbeUsageError(UserError, RuntimeError)``, ``MissingDependencyError(UserError,
ImportError)``, ...).

Example:
    >>> issubclass(RunInUseError, UserError), str(UserError("config.yaml: bad 'epochs'"))
    (True, "config.yaml: bad 'epochs'")
    >>> issubclass(ConfigError, ValueError) and issubclass(ConfigError, UserError)
    True
"""

from __future__ import annotations

import errno

from gammatrace._version import __version__

# The command line's last line under the traceback of any other exception.
BUG_REPORT = (f"this is a bug in gammatrace {__version__}, not in your input: please report it on the project's "
              "issue tracker with the command, its config and the traceback above")


class UserError(Exception):
    """An error the user can fix; its message names the file or field and the fix."""


class ConfigError(UserError, ValueError):
    """A value the user chose (a config field, a command-line switch, a network's option)
    is out of range or inconsistent with another; a ``ValueError`` too, for Python callers."""


class OptionError(UserError, TypeError):
    """A technique (an activation, a norm, an init) was given an option it does not take;
    a ``TypeError`` too, as a Python call with an unknown keyword would be."""


class IntegrationError(UserError, RuntimeError):
    """A framework integration (Lightning, Hugging Face) is used in a way it cannot measure,
    or its framework is missing."""


class RunInUseError(UserError):
    """Another live process writes the same run or study folder."""


class DiskError(UserError):
    """The file system refused a write (no space left, permission denied, read-only)."""


_OS_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "read-only file system", errno.ENOTDIR: "a path component is a file, not a folder",
               errno.EEXIST: "a file is in the way of a folder"}


def os_error(exc: OSError, what: str) -> UserError | None:
    """The user-fixable OSError ``exc`` met while ``what`` as a :class:`DiskError`; None
    for other OS errors (bugs keep their traceback).

    Example:
        >>> print(os_error(OSError(28, "No space left on device"), "writing runs/a/x.pt"))
        writing runs/a/x.pt: no space left on device; free some space and rerun the same command to resume
    """
    reason = _OS_REASONS.get(exc.errno)
    if reason is None:
        return None
    fix = {errno.ENOSPC: "free some space and rerun the same command to resume",
           errno.EDQUOT: "free some space and rerun the same command to resume"}.get(
        exc.errno, "choose another --out or fix the folder's permissions")
    return DiskError(f"{what}: {reason}; {fix}")
