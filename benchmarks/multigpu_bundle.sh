#!/usr/bin/env bash
# Build .whl/ on a machine where pip has network: Ray (core + Serve) and the OpenAI client for the GPU box, which
# has none and lacks them. Ray's wheel (79 MB) loses its Java jars and the dashboard's source maps, so that all
# of .whl/ (58 MB) fits one device call (64 MiB). Listed: what Ray core, Ray Serve, moeserve's HTTP app and the
# serving tests import that the box's Python 3.12 lacks (checked by importing in a bare venv, 2026-11-25);
# what the box already has (torch, numpy, aiohttp, requests, click, msgpack, protobuf, pyyaml, tqdm, ...) is not
# (typing-extensions travels anyway: pydantic wants a recent one).
# Then, on the box: `bash benchmarks/multigpu_session.sh` with `.whl` carried.
#   usage (repo root): bash benchmarks/multigpu_bundle.sh [OUT_DIR, default .whl]   (needs pip and zip)
set -euo pipefail
out=${1:-.whl}
ray_version=${RAY_VERSION:-2.60.0}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$1" "${@:2}"
}
get "$tmp" "ray==$ray_version"
ray_whl=$(ls "$tmp"/ray-*.whl)
zip -q -d "$ray_whl" 'ray/jars/*' 'ray/dashboard/client/build/static/js/*.map'
mkdir -p "$tmp/ray-$ray_version.dist-info"
unzip -p "$ray_whl" "ray-$ray_version.dist-info/RECORD" | grep -v '^ray/jars/\|\.js\.map,' \
    > "$tmp/ray-$ray_version.dist-info/RECORD"
(cd "$tmp" && zip -q "$ray_whl" "ray-$ray_version.dist-info/RECORD")
mv "$ray_whl" "$out/"
get "$out" jsonschema jsonschema-specifications referencing rpds-py \
    fastapi annotated-doc starlette uvicorn h11 anyio sniffio pydantic pydantic-core annotated-types \
    typing-inspection typing-extensions opentelemetry-api importlib-metadata zipp grpcio grpcio-reflection \
    httpx httpcore openai distro jiter
du -sh "$out"
