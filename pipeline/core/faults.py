"""Named crash points for the crash tests: ``NDOP_FAULT=<point>`` ends the process there, abruptly.

A real kill (``os._exit``: no cleanup, no ``finally``) at a chosen step is what proves a re-run
resumes correctly; nothing happens unless the variable names that exact point.
"""
from __future__ import annotations

import logging
import os

_LOGGER = logging.getLogger(__name__)

FAULT_ENV = "NDOP_FAULT"
EXIT_CODE = 86


def fault_point(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        _LOGGER.error("fault injection: exiting abruptly at %s", point)
        logging.shutdown()
        os._exit(EXIT_CODE)
