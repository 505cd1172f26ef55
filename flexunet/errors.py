"""Errors caused by user input.

Anything the user can fix (a config value, a file on disk, a command-line argument) raises a
subclass of :class:`FlexUNetError`. The command line prints such errors as one line and exits
with status 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class FlexUNetError(Exception):
    """Base class of every error the user can fix."""


class ConfigError(FlexUNetError):
    """A config file, a study file or a value in one of them is wrong."""


class DataError(FlexUNetError):
    """An image, a mask, a CSV or a volume on disk is missing, corrupt or inconsistent."""
