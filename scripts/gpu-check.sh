#!/usr/bin/env bash
# The GPU checks, as one short script for a lent CUDA machine (never CI, which has no GPU):
# environment, the CUDA tests (tests/test_gpu.py, spconv agreement), and the conv and model benchmarks on
# CUDA, torch backend side by side with spconv. Each step has its own time limit and log, so one failing
# step still leaves the others' results.
#
#   scripts/gpu-check.sh OUTDIR [SITE_TAR_XZ]
#
# SITE_TAR_XZ: a tar.xz of a site-packages folder (spconv-cu1xx, cumm and their pure-Python needs) for a
# machine that cannot reach a package index; it is unpacked to /tmp/ctvq-site and put on PYTHONPATH.
# PYTHON picks the interpreter (default python3, which must hold torch with CUDA).
set -u
out=${1:?usage: scripts/gpu-check.sh OUTDIR [SITE_TAR_XZ]}
site=${2:-}
py=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
rm -f "$out/summary.txt"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$site" ]; then
    mkdir -p /tmp/ctvq-site
    tar -xJf "$site" -C /tmp/ctvq-site --strip-components=1 || { echo "cannot unpack $site" >&2; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/ctvq-site"
fi
cd "$root" || exit 1

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUTDIR/NAME.log, report rc and time
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc in $(($(date +%s) - start)) s" | tee -a "$out/summary.txt"
}

step env 60 bash -c "nvidia-smi; $py - <<'EOF'
import sys, torch
print(sys.version)
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
print('nccl', torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else None)
try:
    import spconv, cumm
    print('spconv', spconv.__version__, 'cumm', cumm.__version__)
except Exception as exc:
    print('spconv unavailable:', exc)
EOF"
step pytest 200 "$py" -m pytest -q -p no:cacheprovider -rA tests/test_gpu.py tests/test_sparse_backends.py
step sparse_conv 80 "$py" bench/sparse_conv.py --device cuda --voxels 20000 80000 320000 \
    --channels 64 128 512 --repeats 5 --out "$out/sparse_conv_cuda.json"
step model 220 "$py" bench/model.py --device cuda --threads 4 --points 5000 20000 80000 160000 640000 \
    --compare-backends spconv --timeout 120 --out "$out/model_cuda.json"

