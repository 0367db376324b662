"""Packages and package data; everything else is in setup.cfg.

The bundles and the sample data live at the top of the repository (``bundles/``, ``sample_data/``);
a wheel carries them as ``app/_shipped/bundles`` and ``app/_shipped/sample_data`` (see app/resources.py).
"""

from pathlib import Path

from setuptools import find_packages, setup

# (a Docker layer that installs the dependencies before copying the data has neither folder yet)
SHIPPED = {name: folder for name, folder in {"app._shipped.bundles": "bundles",
                                             "app._shipped.sample_data": "sample_data"}.items()
           if (Path(__file__).parent / folder).is_dir()}

setup(
    packages=find_packages(include=["app", "app.*"]) + list(SHIPPED),
    package_dir=SHIPPED,
    package_data={name: ["**/*"] for name in SHIPPED},
)
