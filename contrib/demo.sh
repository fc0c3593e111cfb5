#!/usr/bin/env bash
# Set-up command 1 (README): installs the system packages, builds vmback and installs it
# (the binary in /usr/local/bin, the mount(8) helper /sbin/mount.fuse.vmback, bash, zsh
# and fish completions, and the man pages), then writes a small sample backup set with
# vmback's own stream writer (no VM needed), mounts it with `mount -t fuse.vmback`, shows
# the tree with `ls -l`, reads a little from an image, and unmounts with `vmback umount`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/install-deps.sh
cargo build --release --quiet

echo "== installing vmback"
prefix=/usr/local
install -D -m 0755 target/release/vmback "$prefix/bin/vmback"
vmback="$prefix/bin/vmback"
# mount(8) runs /sbin/mount.<type> for `-t fuse.vmback` and for fstab lines of that type.
ln -sfn "$vmback" /sbin/mount.fuse.vmback
install -d "$prefix/share/bash-completion/completions" "$prefix/share/zsh/site-functions" \
  "$prefix/share/fish/vendor_completions.d" "$prefix/share/man/man1"
"$vmback" completions bash >"$prefix/share/bash-completion/completions/vmback"
"$vmback" completions zsh >"$prefix/share/zsh/site-functions/_vmback"
"$vmback" completions fish >"$prefix/share/fish/vendor_completions.d/vmback.fish"
"$vmback" man "$prefix/share/man/man1"
mandb -q 2>/dev/null || true
echo "installed: $vmback, /sbin/mount.fuse.vmback, completions, man vmback (and man vmback-mount, ...)"

work=$(mktemp -d /tmp/vmback-demo.XXXXXX)
mnt="$work/mnt"
mkdir -p "$mnt"
trap '"$vmback" umount "$mnt" 2>/dev/null || true; rm -rf "$work"' EXIT
"$vmback" sample "$work/backup"
echo "== vmback ls $work/backup"
"$vmback" ls "$work/backup"
echo "== mount -t fuse.vmback $work/backup $mnt -o ro"
mount -t fuse.vmback "$work/backup" "$mnt" -o ro
echo "== ls -lR $mnt"
ls -lR "$mnt"
echo "== du -h (thin sizes) and the first bytes of the newest sda.raw"
du -h "$mnt"/sample-vm/latest/*.raw
head -c 64 "$mnt/sample-vm/latest/sda.raw"; echo
echo "== cache counters ($mnt/.stats)"
cat "$mnt/.stats"
echo "== vmback umount $mnt"
"$vmback" umount "$mnt"
