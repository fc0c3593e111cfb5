#!/usr/bin/env bash
# check.sh DEB: installs the package on this machine as a user would (`apt-get install
# ./DEB`, which also pulls its Depends), checks what it installed works, and purges it
# again. Root only. Used by the integration tests; prints one line per check.
#   - vmback --version runs from /usr/bin, and mount(8) finds /usr/sbin/mount.fuse.vmback:
#     a sample set mounts with `mount -t fuse.vmback` and an image reads;
#   - the man pages are found by man(1), bash completion is in place;
#   - the systemd unit loads in `systemd-analyze verify` with its /usr/bin paths;
#   - after `dpkg --purge` no file of it is left.
set -euo pipefail
deb=$(realpath "$1")
work=$(mktemp -d /tmp/vmback-debcheck.XXXXXX)
cleanup() {
  umount "$work/mnt" 2>/dev/null || true
  dpkg --purge vmback >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends "$deb" >"$work/apt.log" 2>&1 ||
  { cat "$work/apt.log"; exit 1; }
dpkg-query -W -f='installed ${Package} ${Version}\n' vmback

/usr/bin/vmback --version
[ "$(readlink -f /usr/sbin/mount.fuse.vmback)" = /usr/bin/vmback ]
/usr/bin/vmback sample "$work/set" >/dev/null
mkdir "$work/mnt"
mount -t fuse.vmback "$work/set" "$work/mnt" -o ro
head -c 4096 "$work/mnt/sample-vm/latest/sda.raw" | wc -c | sed 's/^/read bytes through mount -t fuse.vmback: /'
umount "$work/mnt"
man -w vmback-mount
[ -s /usr/share/bash-completion/completions/vmback ] && echo "bash completion installed"
if command -v systemd-analyze >/dev/null; then
  cp /usr/share/doc/vmback/examples/vmback-backup.conf "$work/check.conf"
  # A template unit is verified through an instance; its conf file is only a condition.
  out=$(systemd-analyze verify --man=no /usr/lib/systemd/system/vmback@.service 2>&1 | grep 'vmback@' || true)
  [ -z "$out" ] || { echo "systemd-analyze: $out"; exit 1; }
  echo "systemd unit verifies"
fi

files=$(dpkg -L vmback | while read -r f; do if [ -f "$f" ] || [ -L "$f" ]; then echo "$f"; fi; done)
dpkg --purge vmback >/dev/null
left=$(for f in $files; do if [ -e "$f" ] || [ -L "$f" ]; then echo "$f"; fi; done)
[ -z "$left" ] || { echo "left after purge: $left"; exit 1; }
echo "purged, no file left"
