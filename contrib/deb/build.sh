#!/usr/bin/env bash
# build.sh [--bin BINARY] [OUTDIR]: builds the Debian package of vmback
# (OUTDIR/vmback_<version>_<arch>.deb, default OUTDIR target/debian) and prints its path.
#
# The package holds what `contrib/demo.sh` installs by hand, at Debian's paths:
#   /usr/bin/vmback
#   /usr/sbin/mount.fuse.vmback -> ../bin/vmback   (mount(8) helper; /sbin is /usr/sbin)
#   /usr/share/man/man1/vmback*.1.gz               (generated: `vmback man`)
#   bash, zsh and fish completions                 (generated: `vmback completions`)
#   /usr/lib/systemd/system/vmback@.service        (paths rewritten to /usr/bin)
#   /usr/share/doc/vmback/                         README, copyright, example unit and conf
# Depends are computed by dpkg-shlibdeps from the binary's libraries (libvirt, libnbd,
# glibc, ...), plus fuse3 (fusermount3, the kernel side of mounts by non-root users) and
# qemu-utils (qemu-img, qemu-nbd: qcow2 restore output and offline backups).
# dpkg-deb builds it (no cargo-deb: it would be compiled on every CI run; dpkg-dev is
# Debian's own tool for this and is installed by contrib/install-deps.sh).
# --bin BINARY packages that binary as it is (the tests package the one under test);
# without it a release build is made first.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=
if [ "${1:-}" = --bin ]; then bin=$2; shift 2; fi
out=${1:-target/debian}
if [ -z "$bin" ]; then
  cargo build --release --quiet --bin vmback
  bin=target/release/vmback
fi
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d /tmp/vmback-deb.XXXXXX)
trap 'rm -rf "$stage"' EXIT
root=$stage/root

install -D -m 0755 "$bin" "$root/usr/bin/vmback"
strip --strip-debug "$root/usr/bin/vmback"
install -d "$root/usr/sbin"
ln -s ../bin/vmback "$root/usr/sbin/mount.fuse.vmback"

install -d "$root/usr/share/man/man1"
"$root/usr/bin/vmback" man "$root/usr/share/man/man1"
gzip -9n "$root"/usr/share/man/man1/*.1

install -d "$root/usr/share/bash-completion/completions" \
  "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
"$root/usr/bin/vmback" completions bash >"$root/usr/share/bash-completion/completions/vmback"
"$root/usr/bin/vmback" completions zsh >"$root/usr/share/zsh/vendor-completions/_vmback"
"$root/usr/bin/vmback" completions fish >"$root/usr/share/fish/vendor_completions.d/vmback.fish"

install -d "$root/usr/lib/systemd/system"
sed 's#/usr/local/bin/vmback#/usr/bin/vmback#g' contrib/systemd/vmback@.service \
  >"$root/usr/lib/systemd/system/vmback@.service"
doc=$root/usr/share/doc/vmback
install -d "$doc/examples"
install -m 0644 README.md "$doc/README.md"
install -m 0644 contrib/systemd/example.conf "$doc/examples/vmback-backup.conf"
install -m 0644 contrib/systemd/mnt-vmback.mount "$doc/examples/mnt-vmback.mount"
cat >"$doc/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: vmback
Files: *
License: GPL-3.0-or-later
 On Debian systems the full text is in /usr/share/common-licenses/GPL-3.
EOF

# dpkg-shlibdeps wants a source package's debian/control to run in.
mkdir -p "$stage/src/debian"
printf 'Source: vmback\n\nPackage: vmback\nArchitecture: any\n' >"$stage/src/debian/control"
shlibs=$(cd "$stage/src" && dpkg-shlibdeps -O -e"$root/usr/bin/vmback" 2>/dev/null |
  sed -n 's/^shlibs:Depends=//p')
size_kib=$(du -sk "$root" | cut -f1)

install -d "$root/DEBIAN"
# Recommends: libnbd-bin gives nbdinfo (backup -q), openssh-client the remote hypervisors
# (qemu+ssh, boot files and qemu-nbd over ssh).
cat >"$root/DEBIAN/control" <<EOF
Package: vmback
Version: $version
Architecture: $arch
Maintainer: vmback developers <vmback@localhost>
Installed-Size: $size_kib
Depends: $shlibs, fuse3, qemu-utils
Recommends: virtnbdbackup, libnbd-bin, openssh-client
Section: admin
Priority: optional
Description: mount, back up and restore libvirt/KVM backups
 vmback backs up libvirt domains (full, incremental, differential, copy) in
 virtnbdbackup's stream format, mounts backup sets as raw disk images through
 FUSE (writable through an overlay, so a VM boots from its backup), and restores
 them. Backup sets written by virtnbdbackup mount and restore with vmback, and
 the other way round.
EOF

mkdir -p "$out"
deb=$out/vmback_${version}_${arch}.deb
dpkg-deb --build --root-owner-group -Zxz "$root" "$deb" >/dev/null
echo "$deb"
