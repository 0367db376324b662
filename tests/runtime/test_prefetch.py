"""``import_in_background`` imports on a thread, once, and leaves a failing import to the later one."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
from app.runtime.prefetch import import_in_background
assert "xml.dom.minidom" not in sys.modules
t = import_in_background("xml.dom.minidom", "no_such_module_segapp")
t.join(30)
assert "xml.dom.minidom" in sys.modules and "no_such_module_segapp" not in sys.modules
assert import_in_background("xml.dom.minidom") is None  # imported: nothing to start
assert import_in_background("no_such_module_segapp") is None  # tried once: not again
try:
    import no_such_module_segapp  # noqa: F401
except ModuleNotFoundError:
    print("ok")
"""


def test_background_import_in_a_fresh_process():
    run = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["ok"]
