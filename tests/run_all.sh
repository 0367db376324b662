#!/usr/bin/env bash
# The test command: installs the system tools the tests talk to when they are missing (Orthanc PACS with
# DICOMweb, dicom3tools' dciodvfy, Node.js; Chromium and OHIF for the viewer test), the test extras, then
# runs the suite: the fast lane first (a broken basic fails in minutes), then the slow end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || need+=(orthanc)
ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1 || need+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v node >/dev/null 2>&1 || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Chromium, OHIF's prebuilt viewer and puppeteer-core into a cache (a no-op when present); the viewer test
# skips only when Chromium cannot be installed or started here.
bash tests/helpers/ohif/setup.sh || echo "run_all.sh: viewer setup failed (exit $?): the OHIF test will skip" >&2
python -c "import pytest, pytest_timeout, hypothesis, build, onnx, onnxruntime, onnxscript" 2>/dev/null || python -m pip install -q -e ".[test]"
export SEGAPP_NO_PROGRESS=1 PYTHONUNBUFFERED=1
python -m pytest -q -p no:cacheprovider -m "not slow" "$@"
python -m pytest -q -p no:cacheprovider -m slow "$@"
