"""Errors a person can act on: each ends the program with one line and an exit code.

Exit codes: 0 success; 1 a data, model or training error (or a failed data check); 2 a usage or
configuration error; 3 stopped by SIGTERM/SIGINT: training after saving `last.pt` (resume with --resume),
the data check or the cache build after stopping its workers.
"""

from __future__ import annotations

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


class DataCheckFailed(Exception):
    """The check before training found unreadable images (data.on_bad_image=error): one line, exit code 1."""


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped a mode that keeps no checkpoint (the data check, the cache build): exit code 3."""


def exit_code_and_message(error: BaseException) -> tuple[int, str] | None:
    """(exit code, the one line to print) for an error the user can act on; None for a bug (show the traceback)."""
    from config import ConfigError  # light: a mistyped override is answered at once, before torch loads

    if isinstance(error, Interrupted):  # before the imports below: a stop signal must not wait seconds for them
        return EXIT_INTERRUPTED, f"interrupted: {error}"
    if isinstance(error, (ConfigError, UsageError)):
        return EXIT_USAGE, f"error: {error}"
    # Imported here: each module is heavy (torch, transformers), and only a failing run needs them.
    from catalogue.store import CatalogueError
    from checkpoint import CheckpointError
    from dataloaders import BadImageError, DataFormatError
    from dataloaders.cache import CacheError
    from evaluation import NothingToEvaluateError
    from model import BackboneLoadError
    from trainer import NonFiniteLossError, NoTrainingImagesError, TrainingInterrupted

    if isinstance(error, TrainingInterrupted):
        return EXIT_INTERRUPTED, f"interrupted: {error}"
    if isinstance(error, BadImageError):  # raised in a loader worker: its message is the worker's traceback
        return EXIT_ERROR, (f"error: unreadable image {error.one_line()}; run --mode check to list every bad image, "
                            f"or set data.on_bad_image=skip to leave such images out")
    known = (DataFormatError, DataCheckFailed, BackboneLoadError, NonFiniteLossError, CacheError,
             NoTrainingImagesError, NothingToEvaluateError, CheckpointError, CatalogueError)
    if isinstance(error, known):
        return EXIT_ERROR, f"error: {error}"
    return None
