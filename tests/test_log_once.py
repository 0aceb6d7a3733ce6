"""log_once: a message per key, once per process."""

import logging

from athena_runtime.log_once import log_once


def test_logs_each_key_once(caplog):
    logger = logging.getLogger("athena_runtime.test_log_once")
    with caplog.at_level(logging.INFO, logger=logger.name):
        assert log_once(logger, ("test_log_once", 1), logging.INFO, "shape %d", 1)
        assert not log_once(logger, ("test_log_once", 1), logging.WARNING, "shape %d again", 1)
        assert log_once(logger, ("test_log_once", 2), logging.WARNING, "shape %d", 2)
    msgs = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == logger.name]
    assert msgs == [(logging.INFO, "shape 1"), (logging.WARNING, "shape 2")]
