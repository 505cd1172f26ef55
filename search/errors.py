"""What the Python API raises when a study cannot be run to its end, in one small hierarchy.

``Study.run()`` and ``Study.refit()`` (search.api) raise these, as Optuna's ``optimize``
raises rather than returning a status; ``flexunet search`` maps each to its exit status
(``exit_code``), the codes the command always had.

>>> issubclass(StudyInterrupted, StudyError), StudyInterrupted.exit_code, TrialsFailed.exit_code
(True, 130, 1)
>>> from flexunet.errors import FlexUNetError
>>> isinstance(BadInput("[budget] n_trials: expected an integer"), FlexUNetError), BadInput.exit_code
(True, 2)
"""

from __future__ import annotations

from typing import ClassVar

from flexunet.errors import FlexUNetError

__all__ = ["BadInput", "StudyError", "StudyInterrupted", "TrialsFailed"]


class StudyError(Exception):
    """A study run that did not end with its budget spent."""

    exit_code: ClassVar[int] = 1


class StudyInterrupted(StudyError):
    """SIGINT or SIGTERM stopped the launcher; its workers' trials are queued to resume (run the
    study again)."""

    exit_code = 130


class TrialsFailed(StudyError):
    """A worker process failed (its log is named on the terminal), or none could join the
    study (a full database server)."""

    exit_code = 1


class BadInput(StudyError, FlexUNetError):
    """The study, its data or its storage cannot be used as given (a value, a file, a URL); the
    message names it. Also a ``FlexUNetError``, as every user error of flexunet is."""

    exit_code = 2
