"""Validate the repository's manifests of data kept outside the repo (checksums and content of every file).

    python bench/check_manifests.py [data_manifests/hippocampus.json ...]

Prints every problem (each naming its file) and exits non-zero if there is one. The manifest's
``data_root`` is relative to the manifest, so the shared data folder must sit beside the checkout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from app.data.manifest import load_manifest, validate_manifest

REPO = Path(__file__).resolve().parents[1]


def main(paths: list[str]) -> int:
    bad = 0
    for path in paths or [
        str(p) for p in sorted((REPO / "data_manifests").glob("*.json")) if p.name != "manifest.schema.json"
    ]:
        t0 = time.perf_counter()
        m = load_manifest(path)
        problems = validate_manifest(path)
        for p in problems:
            print(p)
        bad += len(problems)
        print(f"{path}: {len(m.cases)} cases, {len(problems)} problem(s) in {time.perf_counter() - t0:.1f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifests", nargs="*", help="manifest files (default: every one in data_manifests/)")
    sys.exit(main(ap.parse_args().manifests))
