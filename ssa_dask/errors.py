"""Exceptions that users of ssa_dask see.

Every problem with the user's input is raised as an :class:`SSAInputError` (a ``ValueError``)
whose message names the problem, so that nothing surfaces as a traceback from deep inside Dask.
"""

from __future__ import annotations


class SSAError(Exception):
    """Base class of every error raised on purpose by ssa_dask."""


class SSAInputError(SSAError, ValueError):
    """The input data cannot be aligned as given (the message says why)."""


class SSAClusterError(SSAError):
    """The Dask cluster could not be started or reached (the message gives the scheduler's reason)."""


class OutputWriteError(SSAError):
    """The output could not be written (a file-system error such as a full disk); nothing was left."""


class OutputExistsError(SSAError, FileExistsError):
    """The output path exists and ``overwrite`` was not requested."""


class ConvergenceWarning(UserWarning):
    """Sinkhorn stopped at ``max_iter`` before the marginals matched to ``tol``."""
