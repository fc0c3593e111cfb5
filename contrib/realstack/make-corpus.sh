#!/usr/bin/env bash
# make-corpus.sh OUTDIR: build a corpus of REAL virtnbdbackup backup sets whose true disk
# contents are known, for testing vmback against the upstream tools.
#
# What it does (see shared/docs/real-stack.md for why each piece is needed):
#  - installs packages, starts libvirtd (libvirtd-up.sh);
#  - wipes OUTDIR (only if it is empty or looks like an earlier corpus) after destroying /
#    undefining a leftover domain `vmback-test`;
#  - starts a transient domain `vmback-test` (kvm if /dev/kvm works, else TCG; 64 MiB RAM;
#    no network; no guest OS; paused) with two 64 MiB qcow2 v3 disks vda and vdb
#    (OUTDIR/disks/), virtio, discard='unmap';
#  - before every backup writes something different into each live disk through HMP
#    qemu-io (pattern writes, offset-numbered writes from a source file, write-zeroes with
#    and without unmap, discards; unaligned ranges, ranges touching the end of the disk,
#    extents >= 32 MiB so compressed streams get chunked LZ4 frames), then flushes;
#  - takes the backups, in this order:
#       sets/plain:      full, inc, inc, diff, inc
#       sets/compressed: full, inc, inc, diff, inc          (--compress)
#       sets/copy:       copy
#       sets/copy-z:     copy                               (--compress)
#  - right after each backup records each disk's true contents as a sparse raw image
#    OUTDIR/truth/<NN>-<level>-<disk>.raw (qemu-img convert -U after a qemu-io flush);
#  - writes OUTDIR/manifest.tsv: set, level, disk, data_file, truth (one row per backup
#    run and disk, in the order the backups were taken);
#  - destroys the domain (libvirtd keeps running) and prints a one-line summary.
# Other output: OUTDIR/logs/ (virtnbdbackup and qemu-io logs). The sets themselves hold
# only what virtnbdbackup wrote, with its mtimes (virtnbdrestore orders files by mtime).
# Set MAKE_CORPUS_VERBOSE=1 for one progress line per backup on stderr,
# MAKE_CORPUS_DOMAIN_TYPE=qemu (or kvm) to force the domain type.
set -euo pipefail

usage() { echo "usage: $0 OUTDIR" >&2; exit 2; }
if [ $# -ne 1 ] || [ -z "$1" ]; then usage; fi

here=$(cd "$(dirname "$0")" && pwd)
start_s=$SECONDS
dom=vmback-test
uri=qemu:///system
disks=(vda vdb)
MiB=1048576
disk_size=$((64 * MiB))
END=$disk_size
domlog=/var/log/libvirt/qemu/$dom.log
verbose=${MAKE_CORPUS_VERBOSE:-0}

die() { echo "make-corpus: $*" >&2; exit 1; }
say() { if [ "$verbose" = 1 ]; then echo "make-corpus: $*" >&2; fi; }
virsh_() { virsh -q -c "$uri" "$@"; }

bash "$here/../install-deps.sh"
bash "$here/libvirtd-up.sh" >/dev/null

# --- OUTDIR: resolve, guard, wipe --------------------------------------------------------
outdir=$(realpath -m -- "$1")
case "$outdir" in
  /*/*) ;;
  *) die "refusing OUTDIR $outdir: give a directory at least two levels below /" ;;
esac
if [ -e "$outdir" ]; then
  [ -d "$outdir" ] || die "$outdir exists and is not a directory"
  if [ -n "$(ls -A "$outdir")" ] && [ ! -e "$outdir/manifest.tsv" ] && [ ! -d "$outdir/sets" ]; then
    die "refusing to wipe $outdir: not empty and does not look like a corpus (no manifest.tsv or sets/)"
  fi
fi

remove_domain() {
  if virsh_ dominfo "$dom" >/dev/null 2>&1; then
    if [ "$(virsh_ domstate "$dom" 2>/dev/null)" != "shut off" ]; then
      virsh_ destroy "$dom" >/dev/null 2>&1 || true
    fi
    # still there = persistent: drop it together with its checkpoint metadata
    if virsh_ dominfo "$dom" >/dev/null 2>&1; then
      virsh_ undefine --checkpoints-metadata --snapshots-metadata "$dom" >/dev/null 2>&1 ||
        virsh_ undefine "$dom" >/dev/null
    fi
  fi
  if virsh_ dominfo "$dom" >/dev/null 2>&1; then die "could not remove leftover domain $dom"; fi
}
remove_domain
trap 'remove_domain' EXIT

rm -rf -- "$outdir"
mkdir -p "$outdir"/{disks,sets,truth,logs,src}
manifest=$outdir/manifest.tsv
printf 'set\tlevel\tdisk\tdata_file\ttruth\n' >"$manifest"

# --- disks and domain --------------------------------------------------------------------
for d in "${disks[@]}"; do
  qemu-img create -q -f qcow2 -o compat=1.1 "$outdir/disks/$d.qcow2" "$disk_size"
done

domain_xml() { # $1 = domain type (kvm|qemu)
  echo "<domain type='$1'>"
  echo "  <name>$dom</name>"
  echo "  <memory unit='MiB'>64</memory>"
  echo "  <vcpu>1</vcpu>"
  echo "  <os><type arch='x86_64'>hvm</type></os>"
  echo "  <devices>"
  for d in "${disks[@]}"; do
    echo "    <disk type='file' device='disk'>"
    echo "      <driver name='qemu' type='qcow2' discard='unmap'/>"
    echo "      <source file='$outdir/disks/$d.qcow2'/>"
    echo "      <target dev='$d' bus='virtio'/>"
    echo "    </disk>"
  done
  echo "    <controller type='usb' model='none'/>"
  echo "    <memballoon model='none'/>"
  echo "  </devices>"
  echo "</domain>"
}

started=""
types=(qemu)
if [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then types=(kvm qemu); fi
if [ -n "${MAKE_CORPUS_DOMAIN_TYPE:-}" ]; then types=("$MAKE_CORPUS_DOMAIN_TYPE"); fi
for t in "${types[@]}"; do
  domain_xml "$t" >"$outdir/logs/domain-$t.xml"
  if virsh_ create "$outdir/logs/domain-$t.xml" --paused >"$outdir/logs/create-$t.log" 2>&1; then
    started=$t
    break
  fi
done
[ -n "$started" ] || die "could not start domain $dom: $(cat "$outdir/logs/create-${types[-1]}.log")"
say "domain $dom started paused (type $started)"

# QOM path of each disk's virtio backend, from `info block` ("Attached to:").
declare -A qom
info_block=$(virsh_ qemu-monitor-command "$dom" --hmp 'info block')
for d in "${disks[@]}"; do
  qom[$d]=$(awk -v f="$outdir/disks/$d.qcow2" '
    index($0, f " (") { hit = 1; next }
    hit && /Attached to:/ { print $3; exit }' <<<"$info_block")
  [ -n "${qom[$d]}" ] || die "no 'Attached to:' for $d in info block:"$'\n'"$info_block"
done

# --- writing into the live disks ---------------------------------------------------------
qio_log=$outdir/logs/qemu-io.log

# bytes N[K|M]: the number qemu-io means by N, N K or N M
bytes() {
  case "$1" in
    *K) echo $((${1%K} * 1024)) ;;
    *M) echo $((${1%M} * MiB)) ;;
    *) echo $(($1)) ;;
  esac
}

# qio DISK CMD: run one qemu-io command on the disk's backend. qemu-io prints into the
# domain log, not the HMP reply: check there that the command really did its I/O.
qio() {
  local d=$1 cmd=$2 before reply new i
  before=$(stat -c %s "$domlog")
  reply=$(virsh_ qemu-monitor-command "$dom" --hmp "qemu-io -d ${qom[$d]} \"$cmd\"") ||
    die "qemu-monitor-command failed for $d: $cmd"
  [ -z "$reply" ] || die "qemu-io on $d: $cmd: unexpected reply: $reply"
  printf '%s: %s\n' "$d" "$cmd" >>"$qio_log"
  [ "$cmd" = flush ] && return 0
  local off len
  off=$(bytes "$(awk '{print $(NF-1)}' <<<"$cmd")")
  len=$(bytes "$(awk '{print $NF}' <<<"$cmd")")
  for i in $(seq 1 50); do
    new=$(tail -c +"$((before + 1))" "$domlog")
    if grep -Eq "^(wrote|discard) $len/$len bytes at offset $off\$" <<<"$new"; then
      return 0
    fi
    if grep -Eqi 'error|failed|invalid' <<<"$new"; then break; fi
    [ "$i" -lt 50 ] && sleep 0.1
  done
  die "qemu-io on $d did not confirm '$cmd'; domain log says: $new"
}

# src TAG LEN: path of a file of LEN bytes made of 16-byte numbered lines "TAG:nnnnnnnnnnn\n"
# (TAG = 3 chars), so every 16 bytes of a written range are distinct: a reader that maps
# an offset wrongly cannot get the right bytes by luck (unlike a constant -P pattern).
src() {
  local tag=$1 len=$2 f="$outdir/src/$1.bin"
  seq -f "$tag:%011.0f" 0 $((len / 16 + 1)) | head -c "$len" >"$f"
  echo "$f"
}

# writes DISK CMD...: run qemu-io commands on one disk, then flush it.
writes() {
  local d=$1 c
  shift
  for c in "$@"; do qio "$d" "$c"; done
  qio "$d" flush
}

# --- backups -----------------------------------------------------------------------------
n=0
# backup SET LEVEL [virtnbdbackup options...]
backup() {
  local setname=$1 level=$2 d tag truth new
  shift 2
  n=$((n + 1))
  tag=$(printf '%02d' "$n")
  local setdir=$outdir/sets/$setname
  declare -A before
  for d in "${disks[@]}"; do
    before[$d]=$(cd "$outdir/sets" && { ls -1 "$setname/$d".*.data 2>/dev/null || true; })
  done
  say "backup $tag: sets/$setname $level $*"
  virtnbdbackup -d "$dom" -l "$level" -o "$setdir" -n "$@" >"$outdir/logs/$tag-$setname-$level.log" 2>&1 ||
    die "virtnbdbackup $level into sets/$setname failed:"$'\n'"$(tail -n 15 "$outdir/logs/$tag-$setname-$level.log")"
  for d in "${disks[@]}"; do
    qio "$d" flush
    truth=truth/$tag-$level-$d.raw
    qemu-img convert -U -O raw "$outdir/disks/$d.qcow2" "$outdir/$truth"
    # the data file this run created: the one new *.data for the disk, also the newest
    # (file names here are ours and plain: ls is fine)
    # shellcheck disable=SC2012
    new=$(cd "$outdir/sets" && comm -13 <(printf '%s\n' "${before[$d]}" | sed '/^$/d' | sort) \
      <(ls -1 "$setname/$d".*.data | sort))
    [ "$(printf '%s\n' "$new" | sed '/^$/d' | wc -l)" = 1 ] ||
      die "expected exactly one new $d data file in sets/$setname after $level, got: ${new:-none}"
    # shellcheck disable=SC2012
    [ "$(cd "$outdir/sets" && ls -1t "$setname/$d".*.data | head -n 1)" = "$new" ] ||
      die "new data file $new is not the newest $d data file in sets/$setname"
    printf 'sets/%s\t%s\t%s\t%s\t%s\n' "$setname" "$level" "$d" "${new#"$setname"/}" "$truth" >>"$manifest"
  done
}

M=$MiB
# The steps. Coverage on purpose: extents >= 32 MiB (chunked LZ4 frames in compressed
# streams: vdb full and vda first inc of sets/compressed), ranges not aligned to 64 KiB or
# even to 512, ranges ending exactly at the end of the disk, write-zeroes with and without
# unmap, discards of whole and partial allocated ranges.
# Chain 1: sets/plain
writes vda "write -P 0xa1 0 1M" \
           "write -s $(src 01a $((34 * M + 12345))) 4M $((34 * M + 12345))" \
           "write -P 0xa3 $((END - 4096)) 4096" \
           "write -P 0xa4 100000 777"
writes vdb "write -P 0xb1 64K 64K" \
           "write -s $(src 01b 100000) 1234567 100000" \
           "write -P 0xb3 $((END - 512)) 512"
backup plain full

writes vda "write -s $(src 02a 5000) 70000 5000" \
           "write -z 4194404 200000"
writes vdb "discard 64K 64K" \
           "write -P 0xb4 40M 3M"
backup plain inc

writes vda "discard 8M 8M" \
           "write -s $(src 03a 108864) 67000000 108864"
writes vdb "write -z -u $((40 * M + 4096)) 1M" \
           "write -P 0xb5 3 1000"
backup plain inc

writes vda "write -P 0xa7 20M 100" \
           "write -s $(src 04a 70000) $((30 * M + 33)) 70000"
writes vdb "write -s $(src 04b 65536) 0 64K" \
           "discard 1152K 128K"
backup plain diff

writes vda "write -P 0xa9 $((M - 10)) 20" \
           "write -z 0 4096"
writes vdb "write -P 0xba 50M 1M" \
           "write -s $(src 05b 1024) $((END - 65536 - 512)) 1024"
backup plain inc

# Chain 2: sets/compressed (its full drops chain 1's checkpoints from the domain)
writes vda "write -P 0xc1 10M 2M"
writes vdb "write -s $(src 06b $((33 * M + 4097))) 5M $((33 * M + 4097))"
backup compressed full --compress

writes vda "write -s $(src 07a $((33 * M))) 6M 33M"
writes vdb "discard 20M 1M"
backup compressed inc --compress

writes vda "write -z -u 12M 5M"
writes vdb "write -s $(src 08b 55555) 99999 55555"
backup compressed inc --compress

writes vda "write -P 0xc3 $((END - 7)) 7"
writes vdb "write -z 5M 4M"
backup compressed diff --compress

writes vda "discard 32M 16M" \
           "write -P 0xc4 44M 1"
writes vdb "write -s $(src 10b $((4 * M))) 60M 4M"
backup compressed inc --compress

# Copies
writes vda "write -P 0xe1 512 512"
writes vdb "write -s $(src 11b $((2 * M))) 2M 2M"
backup copy copy

writes vda "write -s $(src 12a $((3 * M))) 45M 3M"
writes vdb "write -z 0 1M"
backup copy-z copy --compress

# Every step changed every disk: consecutive truth files must differ.
for d in "${disks[@]}"; do
  prev=""
  while IFS= read -r t; do
    if [ -n "$prev" ] && cmp -s "$outdir/$prev" "$outdir/$t"; then
      die "$t equals $prev: a write step did not change $d"
    fi
    prev=$t
  done < <(awk -F '\t' -v d="$d" 'NR > 1 && $3 == d { print $5 }' "$manifest")
done

trap - EXIT
remove_domain
rm -rf -- "$outdir/src"
rows=$(($(wc -l <"$manifest") - 1))
echo "make-corpus: $n backups ($rows manifest rows, domain type $started) in $outdir in $((SECONDS - start_s)) s"
