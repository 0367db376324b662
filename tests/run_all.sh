#!/usr/bin/env bash
# The test command: installs the system tools the tests talk to (Orthanc PACS with DICOMweb,
# dicom3tools' dciodvfy) when they are missing, the test extras, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || need+=(orthanc)
ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1 || need+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
python -c "import pytest, pytest_timeout" 2>/dev/null || python -m pip install -q -e ".[test]"
export SEGAPP_NO_PROGRESS=1 PYTHONUNBUFFERED=1
exec python -m pytest -q -p no:cacheprovider "$@"
