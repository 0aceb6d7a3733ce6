"""Log a message the first time its key is seen in this process: kernel paths and fallbacks are logged once per
layer shape, not once per call."""

from __future__ import annotations

import logging
import threading

_seen: set = set()
_lock = threading.Lock()


def log_once(logger: logging.Logger, key, level: int, msg: str, *args) -> bool:
    """`logger.log(level, msg, *args)` unless `key` (any hashable, e.g. (module, what, shape)) was logged before;
    returns whether it logged."""
    with _lock:
        if key in _seen:
            return False
        _seen.add(key)
    logger.log(level, msg, *args)
    return True
