#!/usr/bin/env bash
# vmback remote backup benchmark: bash contrib/bench/remote.sh [--quick] [--reps N] [--keep] [--out FILE]
#
# A full backup of a domain on the second host (contrib/realstack/remote-host.sh: a
# network namespace behind a veth pair, its own sshd and libvirtd), taken from this side
# over qemu+ssh:// with the backup job's NBD server on TCP at the host's address, plain
# and with --tls. The domain (no guest OS, paused) has two qcow2 disks of 1 GiB each
# (256 MiB with --quick), half of each written through HMP qemu-io (alternating 64 MiB
# extents of random bytes and numbered text lines, holes in between). Side by side in one
# run, each mode:
#   - wall time of `vmback backup -l full` and Debian's `virtnbdbackup -l full` (1.9.15),
#     the same options (-U, --ssh-user, -I, -P, --tls), each a fresh chain (a full
#     deletes the other tool's checkpoints);
#   - the MB/s of vmback against a plain `nbdcopy` of the same exports to null: a backup
#     job started with `virsh backup-begin` (the same pull-mode TCP server), both disks
#     copied at once (as vmback does), nbdcopy's defaults (multi-conn, 64 requests in
#     flight), timed from its start to the end of both copies; vmback's transfer time is
#     the one it prints (from its first extent query to the last file synced and
#     renamed), and its whole run's time is shown too (with the libvirt and ssh
#     connections, checkpoints, job start and end, qemu-img info over ssh).
# MB/s is the disks' allocated bytes over that time (the same bytes for all). The
# page cache is dropped before every timed run. Targets: vmback at most half of
# virtnbdbackup's time, at least 0.9x nbdcopy's MB/s. vmback fsyncs each data file,
# virtnbdbackup does not; nbdcopy writes nothing.
# Prints a markdown table of medians and ratios (and writes it to --out FILE, default
# WORKDIR/remote-results.md). The first vmback set of each mode is restored with vmback
# and compared with the disks (untimed): the run fails on a wrong image or a setup error,
# never on a number.
#
# Needs root (drop_caches, namespaces). Work files go to $VMBACK_BENCH_DIR (default: a new
# /var/tmp/vmback-remote-bench.XXXXXX, removed at the end unless --keep); a full run needs
# about 3 GB there and takes about 3 minutes after the release build. The domain is
# vmb-bench-remote on the second host (destroyed at the end; the host keeps running).
set -euo pipefail
cd "$(dirname "$0")/../.."

. contrib/bench/common.sh
bench_args remote.sh "drop_caches, the second host's namespaces" "$@"

MiB=1048576
if [ $quick = 1 ]; then SIZE_MIB=256; else SIZE_MIB=1024; fi
SIZE=$((SIZE_MIB * MiB))
EXT=$((SIZE / 16))                 # one data extent; every other one is written: half
disks=(vda vdb)
dom=vmb-bench-remote
R=contrib/realstack/remote-host.sh
# NBD ports of this benchmark's own on the host (the tests use 10809-10899)
PORT=10950
CPORT=10952

say() { echo "[$(date +%T)] $*" >&2; }
die() { echo "remote.sh: $*" >&2; exit 1; }

cargo build --release --quiet --bin vmback
vmback=${VMBACK_BIN:-$PWD/target/release/vmback}
env_lines=$(bash "$R" start)
addr=$(sed -n 's/^VMBACK_REMOTE_ADDR=//p' <<<"$env_lines")
[ -n "$addr" ] || die "remote-host.sh start printed no address"
uri="qemu+ssh://root@$addr/system"

work=${VMBACK_BENCH_DIR:-$(mktemp -d /var/tmp/vmback-remote-bench.XXXXXX)}
mkdir -p "$work"/{src,sets}
out=${out:-$work/remote-results.md}
log=$work/commands.log
: >"$log"

med() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
hvirsh() { bash "$R" exec virsh -q -c qemu:///system "$@"; }
# client CMD...: run as a backup host of the second one (its ssh key, known_hosts, libnbd
# certificates; see remote-host.sh client)
client() { bash "$R" client "$@"; }

cleanup() {
  hvirsh domjobabort "$dom" >/dev/null 2>&1 || true
  hvirsh destroy "$dom" >/dev/null 2>&1 || true
  if [ $keep = 0 ]; then rm -rf -- "$work"; else echo "remote.sh: work files kept in $work" >&2; fi
}
trap cleanup EXIT

say "domain $dom: 2 disks x $SIZE_MIB MiB on $addr"
bash "$R" domain "$dom" "$SIZE_MIB" >>"$log" 2>&1 || die "remote-host.sh domain failed (see $log)"

# Source files on /var/tmp, which the host's mount namespace shares: random bytes and
# numbered text lines.
head -c "$EXT" /dev/urandom >"$work/src/r0"
{ seq -f "t00:%011.0f" 0 $((EXT / 16 + 1)) || true; } | head -c "$EXT" >"$work/src/t0"
say "writing $((SIZE_MIB / 2)) MiB into each disk"
for d in "${disks[@]}"; do
  cmds=()
  for i in $(seq 0 7); do
    if [ $((i % 2)) = 0 ]; then s=r0; else s=t0; fi
    cmds+=("write -s $work/src/$s $((2 * i * EXT)) $EXT")
  done
  bash "$R" write "$dom" "$d" "${cmds[@]}" >>"$log" 2>&1 || die "write failed (see $log)"
done
DATA=$((2 * SIZE / 2))             # allocated bytes of both disks

# check SET: vmback's restore of the set equals the disks' truth taken on the host.
check() {
  local set=$1 d img
  rm -rf -- "$work/restored"
  "$vmback" restore -i "$set" -o "$work/restored" >>"$log" 2>&1 || die "vmback restore $set failed"
  for d in "${disks[@]}"; do
    bash "$R" truth "$dom" "$d" "$work/truth-$d.raw" >>"$log" 2>&1 || die "truth of $d failed"
    img=$(find "$work/restored" -maxdepth 1 \( -name "$d.raw" -o -name "$d.qcow2" -o -name "*-$d.qcow2" \) | head -n 1)
    qemu-img compare -q -F raw "$img" "$work/truth-$d.raw" || die "$set: $d restored by vmback differs from the disk"
    rm -f "$work/truth-$d.raw"
  done
  rm -rf -- "$work/restored"
}

# nbdcopy_both TLS: a pull-mode backup job of both disks on TCP (as the tools start it),
# then nbdcopy of each export to null, at once; prints the wall time of the copies.
nbdcopy_both() {
  local tls=$1 scheme=nbd attr="" d t0 t1 pids=()
  if [ "$tls" = 1 ]; then scheme=nbds attr=" tls='yes'"; fi
  {
    echo "<domainbackup mode='pull'><server transport='tcp' name='$addr' port='$CPORT'$attr/><disks>"
    for d in "${disks[@]}"; do
      echo "<disk name='$d' backup='yes' type='file'><scratch file='/var/tmp/vmback-bench.$d.scratch'/></disk>"
    done
    echo "</disks></domainbackup>"
  } >"$work/backup.xml"
  hvirsh backup-begin "$dom" "$work/backup.xml" >>"$log" 2>&1 || die "backup-begin failed (see $log)"
  warm_memory
  drop_caches
  t0=$EPOCHREALTIME
  for d in "${disks[@]}"; do
    echo "+ nbdcopy $scheme://$addr:$CPORT/$d null:" >>"$log"
    client nbdcopy "$scheme://$addr:$CPORT/$d" null: >>"$log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || die "nbdcopy failed (see $log)"; done
  t1=$EPOCHREALTIME
  hvirsh domjobabort "$dom" >>"$log" 2>&1 || die "domjobabort failed"
  calc "$t1 - $t0"
}

declare -A T
for mode in tcp tls; do
  tls=()
  t=0
  if [ $mode = tls ]; then tls=(--tls); t=1; fi
  for rep in $(seq 1 "$reps"); do
    say "$mode, run $rep: vmback full, virtnbdbackup full, nbdcopy"
    set=$work/sets/vmback-$mode-$rep
    T[vmback,$mode]+=" $(timed client "$vmback" backup -U "$uri" -d "$dom" -l full -P "$PORT" "${tls[@]}" -o "$set")"
    # its summary line: "Full backup of DOM: ... data saved, ... zero, SECONDS s"
    x=$(sed -n 's/^Full backup of .* zero, \([0-9.]*\) s$/\1/p' "$log" | tail -n 1)
    [ -n "$x" ] || die "no summary line from vmback in $log"
    T[xfer,$mode]+=" $x"
    if [ "$rep" = 1 ]; then check "$set"; fi
    rm -rf -- "$set"
    set=$work/sets/virtnbdbackup-$mode-$rep
    T[virtnbdbackup,$mode]+=" $(timed client virtnbdbackup -U "$uri" --ssh-user root -I "$addr" -P "$PORT" \
      -d "$dom" -l full -n "${tls[@]}" -o "$set")"
    rm -rf -- "$set"
    T[nbdcopy,$mode]+=" $(nbdcopy_both "$t")"
  done
done

mbs() { calc "$DATA / 1000000 / $1"; }
{
  echo "Full backup of a domain on the second host over qemu+ssh://, NBD over TCP through the"
  echo "veth pair; 2 qcow2 disks x $SIZE_MIB MiB, half data (random and text), $((DATA / MiB)) MiB allocated."
  echo "Median of $reps runs, page cache dropped before each; $(nproc) cores. vmback fsyncs its files,"
  echo "virtnbdbackup does not, nbdcopy writes to null."
  echo
  echo "| NBD | vmback run s | virtnbdbackup run s | vmback / virtnbdbackup (goal <= 0.5) | vmback transfer s | nbdcopy s | vmback transfer MB/s | nbdcopy MB/s | vmback / nbdcopy MB/s (goal >= 0.9) | vmback run MB/s |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for mode in tcp tls; do
    # shellcheck disable=SC2086  # the lists are space-separated numbers
    v=$(med ${T[vmback,$mode]}) u=$(med ${T[virtnbdbackup,$mode]}) c=$(med ${T[nbdcopy,$mode]}) x=$(med ${T[xfer,$mode]})
    echo "| $mode | $v | $u | $(calc "$v / $u") | $x | $c | $(mbs "$x") | $(mbs "$c") | $(calc "$c / $x") | $(mbs "$v") |"
  done
  echo
  for mode in tcp tls; do
    for k in vmback xfer virtnbdbackup nbdcopy; do echo "- $mode, $k, every run (s):${T[$k,$mode]}"; done
  done
  echo "- machine load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out"
