#!/usr/bin/env bash
# Every GPU figure in one call on a lent device machine (one short script, well inside its 10 minutes):
#   bench/device_all.sh [--device cuda|cpu] [--out DIR]
# On the device (PyTorch with CUDA, but not MONAI or segapp's other dependencies): first, on this machine,
# `bash bench/device_wheels.sh` fills .whl/ with the wheels the device lacks; the run carries `.whl` and this
# script installs them into /tmp/site. `--device cpu` runs the same steps at tiny sizes (CI smoke test).
# Writes DIR/device_all.json: the device's name and every bench's figures (DIR defaults to $OUT or bench_out).
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
out="${OUT:-bench_out}"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "device_all.sh: unknown option $1 (use --device cuda|cpu, --out DIR)" >&2; exit 2 ;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "device_all.sh: --device must be cuda or cpu, got $device" >&2; exit 2 ;; esac
py=python3
command -v "$py" >/dev/null 2>&1 || py=python
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export SEGAPP_NO_PROGRESS=1 PYTHONUNBUFFERED=1 SEGAPP_HOME="${SEGAPP_HOME:-$(mktemp -d)}"
mkdir -p "$out"
if [ "$device" = cuda ]; then
  infer_args=(--shape 512 512 300)
  train_args=()
  hippo_args=(--budget-min 3)
else
  infer_args=(--shape 64 64 24 --features 4 8)
  train_args=(--quick --steps 2 --warmup 1 --setups hippo --pipelines c,d --workers 0)
  hippo_args=(--budget-min 0.05 --folds 0 --manifest sample_data/hippocampus/manifest.json)
fi
status=0
run() {  # name, then the command; a failing bench is recorded and the others still run
  local name="$1"; shift
  echo "== $name: $*"
  local t0=$SECONDS
  if "$@" > "$out/$name.log" 2>&1; then echo "   ok in $((SECONDS - t0)) s"; else
    echo "   FAILED in $((SECONDS - t0)) s (exit $?): tail of $out/$name.log" >&2; tail -20 "$out/$name.log" >&2; status=1; fi
}
run infer_speed "$py" bench/infer_speed.py --device "$device" "${infer_args[@]}" --json "$out/infer_speed.json"
run infer_speed_cold "$py" bench/infer_speed.py --device "$device" "${infer_args[@]}" --cold --json "$out/infer_speed_cold.json"
run train_throughput "$py" bench/train_throughput.py --device "$device" "${train_args[@]}" --json "$out/train_throughput.json"
run hippo_accuracy "$py" bench/hippo_accuracy.py --device "$device" "${hippo_args[@]}" --json "$out/hippo_accuracy.json"
"$py" - "$out" "$device" <<'PY'
import json, sys, platform
from pathlib import Path
import torch
out, device = Path(sys.argv[1]), sys.argv[2]
name = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else \
    f"CPU ({platform.processor() or platform.machine()})"
doc = {"device": name, "torch": torch.__version__, "requested": device}
for bench in ("infer_speed", "infer_speed_cold", "train_throughput", "hippo_accuracy"):
    f = out / f"{bench}.json"
    doc[bench] = json.loads(f.read_text()) if f.is_file() else None
(out / "device_all.json").write_text(json.dumps(doc, indent=1))
print(f"wrote {out / 'device_all.json'} ({name})")
PY
exit $status
