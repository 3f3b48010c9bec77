"""The user-facing error types, in one leaf module that imports nothing of the package.

The command line (:mod:`bitnet_train.cli`) prints these as one line and exits non-zero without a
traceback; every message names the file, key or tensor at fault. The modules that raise them
re-export them (``bitnet_train.recipe.RecipeError`` is this ``RecipeError``), so either import works.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file, the key and the problem."""


class ModelSpecError(ValueError):
    """A model preset, YAML or checkpoint that cannot be used; the message names the problem."""


class CheckpointError(ValueError):
    """A directory that is not a usable checkpoint; the message names the file and the problem."""


class DataError(ValueError):
    """Input data that cannot be used; the message names the file."""


class AlignDataError(RecipeError):
    """Alignment data that cannot be used; the message names the file/dataset, row and column."""


class DiskFullError(UserError):
    """A write that the filesystem has no room for; the message names the path, the bytes needed or written
    and the bytes free, and what to do. Nothing partial is left where it failed."""


class ExportError(UserError):
    """A checkpoint that cannot be exported as asked; the message names the tensor, key or file."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...); the message names the step."""


# what `bitnet-train` reports as "error: ..." with exit status 2 (TrainingError exits 1, in pretrain)
USER_ERRORS = (UserError, RecipeError, ModelSpecError, CheckpointError, FileNotFoundError)
