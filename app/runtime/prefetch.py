"""Import slow modules on a background thread while the main thread computes."""

from __future__ import annotations

import importlib
import logging
import sys
import threading

logger = logging.getLogger(__name__)
_started: set[str] = set()


def import_in_background(*modules: str) -> threading.Thread | None:
    """Start importing ``modules`` on a daemon thread (None when all are imported or being imported).

    For imports that would otherwise stall a later step: highdicom's takes ~0.45 s (pydicom's table of
    SR codes, built when it is first imported), which then overlaps the network instead of delaying the
    first SEG write of the process. A failure is only logged here: the later ordinary import raises it.
    """
    todo = [m for m in modules if m not in sys.modules and m not in _started]
    if not todo:
        return None
    _started.update(todo)

    def run() -> None:
        for name in todo:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - reported again by the import that needs the module
                logger.debug("background import of %s failed: %s", name, exc)

    thread = threading.Thread(target=run, name="segapp-import", daemon=True)
    thread.start()
    return thread
