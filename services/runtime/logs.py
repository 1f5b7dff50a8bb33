"""structlog JSON logging: one event per line on stderr, ids bound with bind_contextvars."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(service: str, level: str | None = None) -> structlog.stdlib.BoundLogger:
    lvl = getattr(logging, (level or os.environ.get("MLXU_LOG_LEVEL", "INFO")).upper())
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=lvl)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    return structlog.get_logger()


def get(**bound: object) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger().bind(**bound)
