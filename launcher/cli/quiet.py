"""Third-party notices of in-process commands (ftl merge) go to a log file, not the terminal.

Libraries warn through Python's logging (bitsandbytes' "Failed to load CPU gemm_4bit_forward ...") and warnings
(torch's FutureWarnings). While a root handler writes to the file, logging's last-resort handler (stderr)
stays silent; warnings are routed through logging for the time. `verbose` leaves everything as it is."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def libraries_to(path: Path, verbose: bool = False) -> Iterator[None]:
    """Send library log records and Python warnings to PATH (appended) while the block runs."""
    if verbose:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        handler.close()
