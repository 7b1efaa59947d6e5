"""structlog set-up shared by every vdsa command.

Events are named ``<area>.<event>`` (``build.step.start``, ``qemu.exit``,
``mmio.guest_error.readonly_write``) with every value in a named field.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

Renderer = Literal["console", "json"]


def configure(renderer: Renderer = "console", level: int = logging.INFO) -> None:
    """Route all structlog output to stderr with the chosen renderer."""
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if renderer == "json":
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: object) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(**initial)
    return logger
