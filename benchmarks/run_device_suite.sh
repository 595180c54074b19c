#!/usr/bin/env bash
# The device suite in one call, as the device machine's image is (no installs): the project is put on PYTHONPATH
# as the package it installs as (glm4_jax with convert/ and sharding/ inside), results go to $OUT (or suite-out).
#   bash benchmarks/run_device_suite.sh            # on the lent H200 / H100: about 9 minutes
#   OUT=/tmp/s bash benchmarks/run_device_suite.sh --tiny
set -uo pipefail
cd "$(dirname "$0")/.."
stage="$(mktemp -d)"
cp -r glm4_jax "$stage/" && cp -r convert "$stage/glm4_jax/convert" && cp -r sharding "$stage/glm4_jax/sharding" || exit 2
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"${PYTHON:-python3}" benchmarks/device_suite.py --out "${OUT:-suite-out}" --work "$stage/parts" "$@"
