#!/usr/bin/env bash
# vmback backup benchmark: bash contrib/bench/backup.sh [--quick] [--reps N] [--keep] [--out FILE]
#
# Side by side in one run, on one live libvirt domain (no guest OS, paused) with two qcow2
# disks of 1 GiB each (256 MiB with --quick), half of each disk written with data through
# HMP qemu-io (alternating 64 MiB extents of incompressible random bytes and compressible
# numbered text lines, holes in between):
#   - full backup wall time of `vmback backup` and Debian's `virtnbdbackup` (1.9.15);
#   - incremental backup wall time after 5 % of each disk changed (13 scattered 4 MiB
#     writes per GiB, half random, half text, new bytes every time);
#   - both plain and with -z (lz4, level 2); and the size of what each wrote.
# Each tool's full deletes the other's checkpoints, so every measurement is a fresh chain
# of its own: vmback full -> change -> vmback inc into one folder, then virtnbdbackup full
# -> the same kind of change -> virtnbdbackup inc into another. The page cache is dropped
# before every timed run. Target: vmback at most half of virtnbdbackup's time, same size.
# vmback fsyncs every data file before renaming it; virtnbdbackup 1.9.15 does not sync at
# all: vmback's times include getting the data onto the disk, virtnbdbackup's do not
# (the "sync" column times a `sync` right after each virtnbdbackup run, untimed in its
# column, for reference).
# Prints a markdown table of medians and ratios (and writes it to --out FILE, default
# WORKDIR/backup-results.md). The first vmback chain of each mode is restored with vmback
# and compared with the disks (untimed): the run fails on a wrong image or a setup error,
# never on a number.
#
# Needs root (drop_caches; libvirtd, started by contrib/realstack/libvirtd-up.sh). Work
# files go to $VMBACK_BENCH_DIR (default: a new /var/tmp/vmback-backup-bench.XXXXXX,
# removed at the end unless --keep); a full run needs about 3 GB there and takes about
# 2 minutes after the release build. The domain is vmback-bench-backup (destroyed at the
# end).
set -euo pipefail
cd "$(dirname "$0")/../.."

. contrib/bench/common.sh
bench_args backup.sh "drop_caches, libvirtd" "$@"

MiB=1048576
if [ $quick = 1 ]; then SIZE=$((256 * MiB)); else SIZE=$((1024 * MiB)); fi
EXT=$((SIZE / 16))                 # one data extent; every other one is written: half
disks=(vda vdb)
dom='vmback-bench-backup'
uri=qemu:///system
domlog=/var/log/libvirt/qemu/$dom.log

bash contrib/install-deps.sh
bash contrib/realstack/libvirtd-up.sh >/dev/null
cargo build --release --quiet --bin vmback
vmback=${VMBACK_BIN:-$PWD/target/release/vmback}

work=${VMBACK_BENCH_DIR:-$(mktemp -d /var/tmp/vmback-backup-bench.XXXXXX)}
mkdir -p "$work"/{disks,src,sets}
out=${out:-$work/backup-results.md}
log=$work/commands.log
: >"$log"

say() { echo "[$(date +%T)] $*" >&2; }
die() { echo "backup.sh: $*" >&2; exit 1; }
virsh_() { virsh -q -c "$uri" "$@"; }
med() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

remove_domain() {
  if virsh_ dominfo "$dom" >/dev/null 2>&1; then virsh_ destroy "$dom" >/dev/null 2>&1 || true; fi
}
cleanup() {
  remove_domain
  if [ $keep = 0 ]; then rm -rf -- "$work"; else echo "backup.sh: work files kept in $work" >&2; fi
}
trap cleanup EXIT
remove_domain

# --- the domain ------------------------------------------------------------------------
for d in "${disks[@]}"; do
  qemu-img create -q -f qcow2 -o compat=1.1 "$work/disks/$d.qcow2" "$SIZE"
done
{
  echo "<domain type='TYPE'><name>$dom</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
  echo "<os><type arch='x86_64'>hvm</type></os><devices>"
  for d in "${disks[@]}"; do
    echo "<disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>"
    echo "<source file='$work/disks/$d.qcow2'/><target dev='$d' bus='virtio'/></disk>"
  done
  echo "<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>"
} >"$work/domain.tmpl"
started=""
for t in kvm qemu; do
  sed "s/TYPE/$t/" "$work/domain.tmpl" >"$work/domain.xml"
  if virsh_ create "$work/domain.xml" --paused >>"$log" 2>&1; then started=$t; break; fi
done
[ -n "$started" ] || die "could not start $dom (see $log)"
declare -A qom
info_block=$(virsh_ qemu-monitor-command "$dom" --hmp 'info block' | tr -d '\r')
for d in "${disks[@]}"; do
  qom[$d]=$(awk -v f="$work/disks/$d.qcow2" 'index($0, f " (") { hit = 1; next }
    hit && /Attached to:/ { print $3; exit }' <<<"$info_block")
  [ -n "${qom[$d]}" ] || die "no 'Attached to:' for $d"
done

# qio DISK CMD: one qemu-io command on a live disk; its output goes to the domain log,
# which is checked for the I/O (an empty HMP reply proves nothing).
qio() {
  local d=$1 cmd=$2 before new off len reply
  before=$(stat -c %s "$domlog")
  reply=$(virsh_ qemu-monitor-command "$dom" --hmp "qemu-io -d ${qom[$d]} \"$cmd\"") || die "HMP failed: $cmd"
  [ -z "$reply" ] || die "qemu-io on $d: $cmd: $reply"
  [ "$cmd" = flush ] && return 0
  off=$(awk '{ print $(NF-1) }' <<<"$cmd") len=$(awk '{ print $NF }' <<<"$cmd")
  for _ in $(seq 1 100); do
    new=$(tail -c +"$((before + 1))" "$domlog")
    grep -q "^wrote $len/$len bytes at offset $off\$" <<<"$new" && return 0
    grep -qi 'error\|failed' <<<"$new" && break
    sleep 0.05
  done
  die "qemu-io on $d did not confirm '$cmd': $new"
}

# Source files: random bytes (lz4 cannot shrink them) and numbered text lines (it can).
random_src() { head -c "$2" /dev/urandom >"$1"; }
text_src() { { seq -f "$3:%011.0f" 0 $(($2 / 16 + 1)) || true; } | head -c "$2" >"$1"; }

random_src "$work/src/r0" "$EXT"
text_src "$work/src/t0" "$EXT" "t00"
say "writing $((SIZE / 2 / MiB)) MiB into each of ${#disks[@]} disks of $((SIZE / MiB)) MiB (domain type $started)"
for d in "${disks[@]}"; do
  for i in $(seq 0 7); do
    if [ $((i % 2)) = 0 ]; then s=r0; else s=t0; fi
    qio "$d" "write -s $work/src/$s $((2 * i * EXT)) $EXT"
  done
  qio "$d" flush
done

# change N: 5 % of each disk rewritten with new bytes, inside the data (so the disks keep
# their size of data), 4 MiB pieces, half random, half text.
CHUNK=$((4 * MiB))
NCHG=$(((SIZE / 20 + CHUNK - 1) / CHUNK))
change() {
  local n=$1 d i s off
  random_src "$work/src/rc" "$CHUNK"
  text_src "$work/src/tc" "$CHUNK" "$(printf 'c%02d' $((n % 100)))"
  for d in "${disks[@]}"; do
    for i in $(seq 0 $((NCHG - 1))); do
      if [ $((i % 2)) = 0 ]; then s=rc; else s=tc; fi
      # spread over the 8 data extents, at an offset that moves with n
      off=$((2 * (i % 8) * EXT + ((i / 8) * 4 + n % 3) * CHUNK))
      qio "$d" "write -s $work/src/$s $off $CHUNK"
    done
    qio "$d" flush
  done
}

sync_time() { local t0=$EPOCHREALTIME; sync; calc "$EPOCHREALTIME - $t0"; }
mib_of() { du -cb --apparent-size "$@" | tail -n 1 | awk '{ printf "%.1f", $1 / 1048576 }'; }

# check SET: vmback's restore of the set's newest point equals the live disks.
check() {
  local set=$1 d
  rm -rf -- "$work/restored"
  "$vmback" restore -i "$set" -o "$work/restored" --format raw >>"$log" 2>&1 || die "vmback restore $set failed"
  for d in "${disks[@]}"; do
    qio "$d" flush
    qemu-img compare -q -U -f raw -F qcow2 "$work/restored/$d.raw" "$work/disks/$d.qcow2" ||
      die "$set: $d restored by vmback differs from the disk"
  done
  rm -rf -- "$work/restored"
}

declare -A T S
n=0
for mode in plain z; do
  z=()
  [ $mode = z ] && z=(-z)
  for rep in $(seq 1 "$reps"); do
    for tool in vmback virtnbdbackup; do
      set=$work/sets/$tool-$mode-$rep
      n=$((n + 1))
      say "$mode, run $rep: $tool full, change, inc"
      if [ $tool = vmback ]; then
        full=$(timed "$vmback" backup -d "$dom" -l full -o "$set" "${z[@]}")
        change "$n"
        inc=$(timed "$vmback" backup -d "$dom" -l inc -o "$set" "${z[@]}")
        if [ "$rep" = 1 ]; then check "$set"; fi
      else
        full=$(timed virtnbdbackup -d "$dom" -l full -o "$set" -n "${z[@]}")
        s1=$(sync_time)
        change "$n"
        inc=$(timed virtnbdbackup -d "$dom" -l inc -o "$set" -n "${z[@]}")
        s2=$(sync_time)
        T[$tool,$mode,sync]+=" $(calc "$s1 + $s2")"
      fi
      T[$tool,$mode,full]+=" $full"
      T[$tool,$mode,inc]+=" $inc"
      S[$tool,$mode,full]=$(mib_of "$set"/*.full.data)
      S[$tool,$mode,inc]=$(mib_of "$set"/*.inc.*.data)
      rm -rf -- "$set"
    done
  done
done

{
  echo "Backup of a live domain, 2 qcow2 disks x $((SIZE / MiB)) MiB, half data (random and text);"
  echo "inc after 5 % of each disk changed. Median of $reps runs, page cache dropped before each;"
  echo "$(nproc) cores, domain type $started. vmback fsyncs its files, virtnbdbackup does not."
  echo
  echo "| mode | backup | vmback | virtnbdbackup | vmback / virtnbdbackup time (target <= 0.5) | vmback size | virtnbdbackup size |"
  echo "|---|---|---|---|---|---|---|"
  for mode in plain z; do
    for lvl in full inc; do
      # shellcheck disable=SC2086
      a=$(med ${T[vmback,$mode,$lvl]}) b=$(med ${T[virtnbdbackup,$mode,$lvl]})
      r=$(calc "$a / $b")
      v=$(awk "BEGIN { print ($r <= 0.5) ? \"met\" : \"missed\" }")
      label=$mode
      [ $mode = z ] && label="-z"
      echo "| $label | $lvl | $a s | $b s | ${r}x ($v) | ${S[vmback,$mode,$lvl]} MiB | ${S[virtnbdbackup,$mode,$lvl]} MiB |"
    done
  done
  echo
  for mode in plain z; do
    for tool in vmback virtnbdbackup; do
      echo "- $mode, $tool, every run (s): full${T[$tool,$mode,full]}; inc${T[$tool,$mode,inc]}"
    done
    echo "- $mode, virtnbdbackup: sync right after its full + inc (s, not in its times):${T[virtnbdbackup,$mode,sync]}"
  done
  echo "- machine load average at the end: $(cut -d ' ' -f 1-3 /proc/loadavg)"
} | tee "$out"
echo "backup.sh: results in $out" >&2
