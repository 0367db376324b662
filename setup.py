"""Packages and package data; everything else is in setup.cfg.

The bundles (with the bundle schema) and the sample data live at the top of the repository
(``bundles/``, ``sample_data/``); a wheel carries them as ``app/_shipped/bundles`` and
``app/_shipped/sample_data`` (see app/resources.py), and the sdist carries the folders themselves
(MANIFEST.in), so a wheel built from the sdist has them too. Every folder below them is listed as a
package of its own, mapped to its folder, with all its files as package data: setuptools then neither
warns about data folders that look like packages nor depends on ``include_package_data`` for them.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# (a Docker layer that installs the dependencies before copying the data has neither folder yet)
SHIPPED = {
    name: folder
    for name, folder in {"app._shipped.bundles": "bundles", "app._shipped.sample_data": "sample_data"}.items()
    if (HERE / folder).is_dir()
}


def _data_packages() -> dict[str, str]:
    """``{package name: folder}`` for each shipped folder and every folder below it."""
    out = {}
    for name, folder in SHIPPED.items():
        for sub in sorted(p for p in [HERE / folder, *(HERE / folder).rglob("*")] if p.is_dir()):
            rel = sub.relative_to(HERE / folder).parts
            if any("." in part for part in rel):  # a dot would read as a package separator
                raise SystemExit(f"setup.py: rename {sub.relative_to(HERE)}: shipped folder names cannot hold a dot")
            if "__pycache__" not in rel:
                out[".".join((name, *rel))] = sub.relative_to(HERE).as_posix()
    return out


DATA = _data_packages()

setup(
    packages=find_packages(include=["app", "app.*"]) + list(DATA),
    package_dir=DATA,
    package_data={name: ["*"] for name in DATA},
)
