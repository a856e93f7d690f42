#!/usr/bin/env bash
# llama.cpp's tokenizer test vocabularies (models/ggml-vocab-*.gguf, with the .inp/.out goldens of
# its test-tokenizer-0), taken from the llama-cpp-python source package on PyPI, which vendors
# llama.cpp. Prints the folder to export as KILN_LLAMA_VOCABS:
#
#   export KILN_LLAMA_VOCABS=$(scripts/fetch_llama_vocabs.sh [DIR])
#   cargo test --release -p kiln-bpe --test llama_vocabs
#
# DIR defaults to a new temp dir. The source package (~77 MB) is kept in
# ${KILN_CACHE:-~/.cache/kiln}/llama-cpp-python, so a second run downloads nothing; only the
# ggml-vocab-* members are extracted.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
OUT=${1:-$(mktemp -d)}
CACHE=${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}/llama-cpp-python
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
mkdir -p "$OUT" "$CACHE"
if [ ! -s "$SDIST" ]; then
  # The source package is the one with llama.cpp's models/ folder in it. Only it: pip still
  # prepares its metadata, and with `:all:` it would build its build tools (CMake) from source.
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -d "$CACHE" >&2
fi
tar -xzf "$SDIST" -C "$OUT" --wildcards --strip-components=4 \
  "llama_cpp_python-$VERSION/vendor/llama.cpp/models/ggml-vocab-*"
ls "$OUT"/ggml-vocab-*.gguf >/dev/null
echo "$OUT"
