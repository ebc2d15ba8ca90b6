#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels the GPU image lacks (grain, gin-config, tensorflow-datasets,
# array-record, importlib_resources, tiktoken, the server's fastapi/uvicorn/openai, jsonschema) and their small
# dependencies, for Linux x86-64 and Python 3.12, so that a device call can install them offline:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# numpy, absl-py and protobuf are left out (the image has them; a second copy would shadow its own). About 21 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORMS=()
for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
get() { python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d .whl "$@"; }
pin() { grep -i "^$1==" requirements.txt; }
mkdir -p .whl
for name in grain gin-config array-record importlib_resources tiktoken fastapi uvicorn openai jsonschema; do
  get "$(pin "$name")"
done
get 'etils[epath,epy]' dm-tree immutabledict simple_parsing tensorflow-metadata termcolor toml wrapt
get --no-deps "$(pin tensorflow-datasets)"  # its `promise` dependency has no wheel and is not needed to import it
rm -f .whl/numpy-* .whl/absl_py-* .whl/protobuf-*
du -sh .whl
