#!/usr/bin/env bash
# Fill .whl/ with the wheels a lent GPU machine lacks to run bench/device_all.sh (it has PyTorch with CUDA,
# numpy, scipy, scikit-image, pillow, pyyaml, requests and tqdm, Python 3.12 on x86-64, and no network).
# Run on this machine, in the repository root; the device call then carries `.whl` (about 15 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .gitignore || echo "/.whl/" >> .gitignore
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 pydicom==3.0.2 highdicom==0.28.2 pyjpegls \
  pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg pylibjpeg-rle jsonschema jsonschema-specifications referencing \
  rpds-py attrs fire termcolor
du -sh .whl
