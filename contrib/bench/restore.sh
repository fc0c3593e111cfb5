#!/usr/bin/env bash
# vmback restore benchmark: bash contrib/bench/restore.sh [--quick] [--reps N] [--keep] [--out FILE]
#
# A full restore of a chain of 2 GiB images (a full backup of about 1 GiB of data plus
# three incrementals; 512 MiB images with --quick), plain and lz4-compressed, generated
# with examples/gen_chain.rs (one seed: both chains hold the same bytes and share one
# truth image). Measured side by side in one run, each after dropping the page cache:
#   - vmback restore, raw output, and --format qcow2;
#   - Debian's virtnbdrestore (1.9.15) on the same set (it writes qcow2) - target: vmback
#     at least 10x faster;
#   - cp --sparse=always of the truth image (+ fsync), the limit for writing the raw
#     image - target: vmback at least 0.7x its speed;
#   - qemu-img convert -O qcow2 of the truth image (+ fsync), the same for qcow2.
# Every output is checked against the truth (untimed). Prints a markdown table of median
# times and ratios (and writes it to --out FILE, default WORKDIR/restore-results.md).
# Nothing fails on a number: the targets are information. The run fails on a setup error
# or a wrong image.
#
# Needs root (drop_caches, and virtnbdrestore needs the libvirt daemon, started here by
# contrib/realstack/libvirtd-up.sh). Work files go to $VMBACK_BENCH_DIR (default: a new
# /var/tmp/vmback-restore-bench.XXXXXX, removed at the end unless --keep); a full run needs
# about 6 GB there and takes about 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."

. contrib/bench/common.sh
bench_args restore.sh "drop_caches, libvirtd for virtnbdrestore" "$@"
if [ $quick = 1 ]; then SIZE=512M; else SIZE=2G; fi
INCS=3

bash contrib/install-deps.sh
bash contrib/realstack/libvirtd-up.sh >/dev/null
cargo build --release --quiet --bin vmback --example gen_chain
vmback=$PWD/target/release/vmback
gen=$PWD/target/release/examples/gen_chain

work=${VMBACK_BENCH_DIR:-$(mktemp -d /var/tmp/vmback-restore-bench.XXXXXX)}
mkdir -p "$work"
out=${out:-$work/restore-results.md}
log=$work/commands.log
cleanup() {
  if [ $keep = 0 ]; then rm -rf -- "$work"; else echo "restore.sh: work files kept in $work" >&2; fi
}
trap cleanup EXIT

say() { echo "[$(date +%T)] $*" >&2; }
die() { echo "restore.sh: $*" >&2; exit 1; }
med() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# timed_into OUTDIR CMD...: removes OUTDIR, then `timed CMD...` (common.sh).
timed_into() {
  rm -rf -- "$1"
  shift
  timed "$@"
}

# unlocked IMAGE: waits until the qemu-nbd that virtnbdrestore forked lets go of IMAGE.
unlocked() {
  for _ in $(seq 1 200); do
    qemu-img info "$1" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  die "$1 stays locked"
}

# The sets. virtnbdrestore takes the disks to restore from the newest vmconfig: give the
# generated configs a disk (keeping their mtimes, by which it orders the files).
truth_dir=$work/truth
say "generating the chains ($SIZE, full + $INCS incrementals, plain and lz4)"
"$gen" --out "$work/plain" --size "$SIZE" --incrementals "$INCS" --seed 7 --truth-dir "$truth_dir" 2>>"$log"
"$gen" --out "$work/lz4" --size "$SIZE" --incrementals "$INCS" --seed 7 --compress 2 2>>"$log"
truth=$truth_dir/sda.virtnbdbackup.$INCS.raw
[ -f "$truth" ] || die "gen_chain wrote no truth image $truth"
for set in plain lz4; do
  for f in "$work/$set"/vmconfig.*.xml; do
    touch -r "$f" "$work/stamp"
    cat >"$f" <<'EOF'
<domain type='kvm'>
  <name>bench-vm</name>
  <memory unit='KiB'>1048576</memory>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/bench-vm-sda.qcow2'/>
      <target dev='sda' bus='virtio'/>
    </disk>
  </devices>
</domain>
EOF
    touch -r "$work/stamp" "$f"
  done
done
data_of() { du -sb --apparent-size "$work/$1"/*.data | awk '{ s += $1 } END { printf "%.0f", s / 1048576 }'; }

# The limits: the truth image copied (raw) or converted (qcow2), synced like vmback syncs.
cp_truth() { mkdir -p "$1" && cp --sparse=always "$truth" "$1/sda.raw" && sync "$1/sda.raw"; }
convert_truth() { mkdir -p "$1" && qemu-img convert -O qcow2 "$truth" "$1/sda.qcow2" && sync "$1/sda.qcow2"; }

o=$work/out
declare -A T
for set in plain lz4; do
  src=$work/$set
  say "$set: vmback restore raw, qcow2; cp --sparse=always; qemu-img convert (x$reps)"
  vr=() vq=() cpt=() qi=()
  for rep in $(seq 1 "$reps"); do
    vr+=("$(timed_into "$o" "$vmback" restore -i "$src" -o "$o" --format raw)")
    if [ "$rep" = 1 ]; then
      cmp "$o/bench-vm-sda.raw" "$truth" || die "$set: vmback's raw image differs from the truth"
    fi
    vq+=("$(timed_into "$o" "$vmback" restore -i "$src" -o "$o" --format qcow2)")
    if [ "$rep" = 1 ]; then
      qemu-img compare -q -f qcow2 -F raw "$o/bench-vm-sda.qcow2" "$truth" || die "$set: vmback's qcow2 differs from the truth"
    fi
    cpt+=("$(timed_into "$o" cp_truth "$o")")
    qi+=("$(timed_into "$o" convert_truth "$o")")
  done
  say "$set: virtnbdrestore (once)"
  T[$set,up]=$(timed_into "$o" virtnbdrestore -i "$src" -o "$o" -n -L "$work/virtnbdrestore.log")
  unlocked "$o/bench-vm-sda.qcow2"
  grep -q ' ERROR \| CRITICAL ' "$log" && die "$set: virtnbdrestore logged an error (see $log)"
  qemu-img compare -q -f qcow2 -F raw "$o/bench-vm-sda.qcow2" "$truth" || die "$set: virtnbdrestore's image differs from the truth"
  rm -rf -- "$o"
  T[$set,raw]=$(med "${vr[@]}") T[$set,qcow2]=$(med "${vq[@]}") T[$set,cp]=$(med "${cpt[@]}") T[$set,qemu]=$(med "${qi[@]}")
  T[$set,data]=$(data_of "$set")
  T[$set,runs]="vmback raw ${vr[*]}; vmback qcow2 ${vq[*]}; cp ${cpt[*]}; qemu-img ${qi[*]}; virtnbdrestore ${T[$set,up]}"
done

verdict() { awk "BEGIN { print ($1 >= $2) ? \"met\" : \"missed\" }"; }
{
  echo "Restore of a $SIZE disk, full + $INCS incrementals (truth: $(du -m "$truth" | cut -f1) MiB allocated);"
  echo "median of $reps runs (virtnbdrestore: 1), page cache dropped before each; $(nproc) cores."
  echo
  echo "| chain | stream files | vmback raw | vmback qcow2 | virtnbdrestore (qcow2) | cp --sparse=always truth | qemu-img convert truth to qcow2 | virtnbdrestore / vmback raw (target >= 10) | virtnbdrestore / vmback qcow2 (target >= 10) | vmback raw speed vs cp (target >= 0.7) | virtnbdrestore / cp (ceiling for the first ratio) |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  for set in plain lz4; do
    up=${T[$set,up]} raw=${T[$set,raw]} q=${T[$set,qcow2]} cp=${T[$set,cp]}
    r1=$(calc "$up / $raw") r2=$(calc "$up / $q") r3=$(calc "$cp / $raw") r4=$(calc "$up / $cp")
    echo "| $set | ${T[$set,data]} MiB | $raw s | $q s | $up s | $cp s | ${T[$set,qemu]} s |" \
      "${r1}x ($(verdict "$r1" 10)) | ${r2}x ($(verdict "$r2" 10)) | ${r3}x ($(verdict "$r3" 0.7)) | ${r4}x |"
  done
  echo
  for set in plain lz4; do echo "- $set, every run (s): ${T[$set,runs]}"; done
  echo "- machine load average at the end: $(cut -d ' ' -f 1-3 /proc/loadavg)"
} | tee "$out"
echo "restore.sh: results in $out" >&2
