"""fxquant's logger, and `log_once` for fallbacks that must be said once, never silently."""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("fxquant")


@functools.cache
def log_once(level: int, message: str) -> None:
    """Log `message` at `level` the first time it is seen in this process."""
    logger.log(level, message)
