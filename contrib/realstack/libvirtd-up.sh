#!/usr/bin/env bash
# libvirtd-up.sh: make sure a usable libvirtd (qemu:///system) is running on a machine
# without systemd (CI containers, dev boxes). Idempotent.
#
#  1. installs the system packages (contrib/install-deps.sh);
#  2. makes /etc/libvirt/qemu.conf carry the settings that let qemu run as root with no
#     cgroups, no security driver and no virtlogd (see shared/docs/real-stack.md); each
#     key appears once as an active line, re-runs change nothing;
#  3. starts `libvirtd -d` unless it already answers (restarts it, by its pid file, if
#     this run had to change qemu.conf while it was running);
#  4. waits (at most LIBVIRTD_WAIT seconds, default 60) until
#     `virsh -c qemu:///system list` answers.
# Prints one line on success; exits non-zero with a message on failure.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
bash "$here/../install-deps.sh"

uri=qemu:///system
conf=/etc/libvirt/qemu.conf
pidfile=/run/libvirtd.pid
wait_s=${LIBVIRTD_WAIT:-60}

die() { echo "libvirtd-up: $*" >&2; exit 1; }

# alive PID: running and not a zombie waiting to be reaped (no init reaps quickly here)
alive() {
  local st
  st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  case "$st" in Z*) return 1 ;; *) return 0 ;; esac
}

answers() { timeout 10 virsh -c "$uri" list >/dev/null 2>&1; }

# --- qemu.conf ---------------------------------------------------------------------
settings=(
  'user = "root"'
  'group = "root"'
  'security_driver = "none"'
  'cgroup_controllers = [ ]'
  'stdio_handler = "file"'
)
[ -f "$conf" ] || die "$conf missing (is libvirt-daemon-system installed?)"
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
# Drop every active (uncommented) line for our keys, then append our block once.
# (An active multi-line `cgroup_controllers = [` list is not expected on Debian, where
# the shipped file has every setting commented out.)
grep -Ev '^[[:space:]]*(user|group|security_driver|cgroup_controllers|stdio_handler)[[:space:]]*=' \
  "$conf" | sed '/^# vmback realstack settings$/d' >"$tmp" || true
{
  echo '# vmback realstack settings'
  printf '%s\n' "${settings[@]}"
} >>"$tmp"
conf_changed=no
if ! cmp -s "$tmp" "$conf"; then
  cat "$tmp" >"$conf"   # keep the file's owner and mode
  conf_changed=yes
fi

# --- daemon ------------------------------------------------------------------------
running_pid=""
if [ -s "$pidfile" ] && alive "$(cat "$pidfile")"; then
  running_pid=$(cat "$pidfile")
fi

action="already running"
if [ -n "$running_pid" ] && [ "$conf_changed" = yes ]; then
  # Settings are read at start only: restart the daemon that the pid file names.
  kill "$running_pid"
  for _ in $(seq 1 100); do alive "$running_pid" || break; sleep 0.1; done
  if alive "$running_pid"; then die "libvirtd (pid $running_pid) did not stop"; fi
  running_pid=""
  action="restarted (qemu.conf changed)"
fi

if [ -z "$running_pid" ] && [ "$conf_changed" = yes ] && answers; then
  echo "libvirtd-up: warning: changed $conf but the answering libvirtd is not the one in" \
    "$pidfile: restart it yourself so the settings apply" >&2
fi
if [ -z "$running_pid" ] && ! answers; then
  libvirtd -d || die "libvirtd -d failed"
  [ "$action" = "already running" ] && action="started"
fi

deadline=$((SECONDS + wait_s))
until answers; do
  [ "$SECONDS" -lt "$deadline" ] || die "virsh -c $uri list did not answer within ${wait_s}s"
  sleep 0.5
done
echo "libvirtd-up: libvirtd $action, $uri answers (pid $(cat "$pidfile" 2>/dev/null || echo '?'))"
