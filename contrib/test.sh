#!/usr/bin/env bash
# Set-up command 2 (README): installs everything the tests need on a fresh Debian 12
# machine and runs the whole suite: format and lint checks, unit and property tests,
# real FUSE mounts, and the compatibility test against a corpus of real virtnbdbackup
# backups taken from a live libvirt domain (built here, about two minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/install-deps.sh
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
cargo fmt --check
cargo clippy --all-targets -- -D warnings
corpus=${VMBACK_CORPUS:-/var/tmp/vmback-corpus}
bash contrib/realstack/make-corpus.sh "$corpus"
VMBACK_CORPUS="$corpus" cargo test --all-targets
# The fuzz targets (fuzz/, run on nightly by contrib/fuzz.sh) must keep building: stable, no
# sanitizer, sharing this target dir so only libFuzzer and the targets are compiled.
CARGO_TARGET_DIR=target cargo build --manifest-path fuzz/Cargo.toml
VMBACK_CORPUS="$corpus" bash contrib/soak.sh 60
# The tests' second host (contrib/realstack/remote-host.sh, started by the first test that
# needs it and shared by the rest) is stopped once everything has run.
bash contrib/realstack/remote-host.sh stop >/dev/null 2>&1 || true
