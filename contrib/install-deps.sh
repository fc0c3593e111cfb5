#!/usr/bin/env bash
# Installs every system package vmback needs to build, run and test on Debian 12.
# Idempotent: safe to run again; does nothing slow when all is installed.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

pkgs=(fuse3 libfuse3-dev pkg-config e2fsprogs util-linux fdisk gdisk
      libvirt-daemon-system libvirt-clients libvirt-dev qemu-system-x86 qemu-utils
      virtnbdbackup libnbd-bin libnbd-dev nbdkit python3-libnbd time g++
      man-db bash-completion systemd dmsetup dpkg-dev
      openssh-server openssh-client ovmf gnutls-bin iproute2
      sasl2-bin libsasl2-modules)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# A machine image may ship a newer qemu-utils than Debian 12's qemu-system-x86 accepts;
# pin qemu-utils to the distribution's own version so the set is coherent.
qemu_sys=$(apt-cache policy qemu-system-x86 2>/dev/null | awk '/Candidate:/ {print $2}')
qemu_utils=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
if [ ${#missing[@]} -eq 0 ] && [ -n "$qemu_utils" ]; then
  exit 0
fi
apt-get update -qq
qemu_sys=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
args=()
for p in "${missing[@]}" qemu-utils; do
  case "$p" in
    qemu-utils|qemu-system-x86|qemu-system-common|qemu-system-data|qemu-block-extra)
      args+=("$p=$qemu_sys") ;;
    *) args+=("$p") ;;
  esac
done
apt-get install -y -qq --no-install-recommends --allow-downgrades \
  "${args[@]}" "qemu-system-common=$qemu_sys" "qemu-block-extra=$qemu_sys" >/dev/null
