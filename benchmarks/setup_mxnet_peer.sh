#!/usr/bin/env bash
# Install the MXNet 1.9.1 peer for benchmarks/data_throughput.py and benchmarks/pack_throughput.py
# into its own virtual environment, outside the project, and print the python to pass them:
#
#     bash benchmarks/setup_mxnet_peer.sh DIR [PYTHON]
#     export FACEMARGIN_MXNET_PYTHON="$(bash benchmarks/setup_mxnet_peer.sh ~/peers/mxnet | tail -n 1)"
#
# DIR: where the venv goes (created if missing; reused if it already has the pinned versions).
# PYTHON: the interpreter that creates it (default: python3; MXNet 1.9.1's wheel is py3-none,
# numpy 1.23 has wheels for CPython 3.8-3.11).
# Pins: mxnet==1.9.1 (the last 1.x release, what insightface's training code reads with),
# numpy<1.24 (MXNet 1.9.1 uses np.bool, removed in numpy 1.24), opencv-python-headless
# (tools/im2rec.py imports cv2). Everything comes from the package index pip is configured with.
set -euo pipefail
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
fi
dir="$1"
base_python="${2:-python3}"
if [[ ! -x "$dir/bin/python" ]]; then
    "$base_python" -m venv "$dir" >&2
fi
"$dir/bin/python" -m pip install --quiet --disable-pip-version-check \
    "mxnet==1.9.1" "numpy<1.24" "opencv-python-headless" >&2
# The check the benchmarks rely on: the version, the C++ iterator, im2rec and its cv2.
"$dir/bin/python" - >&2 <<'PY'
import os, mxnet as mx, numpy as np, cv2
assert mx.__version__ == "1.9.1", mx.__version__
im2rec = os.path.join(os.path.dirname(mx.__file__), "tools", "im2rec.py")
assert os.path.exists(im2rec), f"{im2rec} missing from the mxnet wheel"
assert hasattr(mx.io, "ImageRecordIter")
print(f"mxnet {mx.__version__}, numpy {np.__version__}, opencv {cv2.__version__}; im2rec: {im2rec}")
PY
# The last line of stdout: the python to pass as --mxnet-python / FACEMARGIN_MXNET_PYTHON.
echo "$(cd "$dir" && pwd)/bin/python"
