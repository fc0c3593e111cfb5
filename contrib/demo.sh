#!/usr/bin/env bash
# Set-up command 1 (README): installs the system packages, builds vmback, writes a small
# sample backup set with vmback's own stream writer (no VM needed), mounts it, shows the
# tree with `ls -l`, reads a little from an image, and unmounts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/install-deps.sh
cargo build --release --quiet
vmback=target/release/vmback
work=$(mktemp -d /tmp/vmback-demo.XXXXXX)
mnt="$work/mnt"
mkdir -p "$mnt"
"$vmback" sample "$work/backup"
echo "== vmback ls $work/backup"
"$vmback" ls "$work/backup"
"$vmback" mount "$work/backup" "$mnt" 2>"$work/mount.log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do mountpoint -q "$mnt" && break; sleep 0.1; done
mountpoint -q "$mnt" || { cat "$work/mount.log"; exit 1; }
echo "== ls -lR $mnt"
ls -lR "$mnt"
echo "== du -h (thin sizes) and the first bytes of the newest sda.raw"
du -h "$mnt"/sample-vm/latest/*.raw
head -c 64 "$mnt/sample-vm/latest/sda.raw"; echo
echo "== cache counters ($mnt/.stats)"
cat "$mnt/.stats"
