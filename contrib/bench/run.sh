#!/usr/bin/env bash
# vmback benchmark suite: bash contrib/bench/run.sh [--quick] [--keep] [--out FILE]
#                                                  [--vmback BIN] [--readahead KB]
#
# Generates synthetic backup sets (examples/gen_chain.rs), mounts them with
# target/release/vmback and measures, each against a baseline measured in the same run:
#   - sequential read of a 2 GiB image (512 MiB with --quick), plain and lz4 chains,
#     against reading the same bytes from a plain sparse raw file ("truth") and against
#     single-threaded lz4_flex decoding the same frames (examples/lz4_baseline.rs);
#   - random 4 KiB pread latency (p50/p99), cold and warm, against the truth file;
#   - mount + `ls -lR` of catalogs of 500 restore points, against `ls -lR` of the folder;
#   - peak RSS (VmHWM) of vmback while reading, against --cache-size + 64 MiB.
# Prints a markdown table (and writes it to --out FILE; with --keep, also WORKDIR/results.md).
# --vmback BIN benchmarks another build (e.g. a patched one) instead of
# target/release/vmback; --readahead KB sets the FUSE mount's readahead
# (/sys/class/bdi/<dev>/read_ahead_kb) after each mount, which the kernel otherwise caps
# at 128 KiB.
# Nothing fails on a number: the targets column is information. The run fails only on a
# setup error or if a mounted image does not hold the truth's bytes.
#
# Needs root (it drops the page cache with /proc/sys/vm/drop_caches, which slows other
# work on the machine for a moment) and /dev/fuse. Work files go to $VMBACK_BENCH_DIR
# (default: a new /tmp/vmback-bench.XXXXXX, removed at the end unless --keep); a full run
# needs about 6 GB there. See doc/BENCHMARKS.md for the method and the last results.
set -euo pipefail
cd "$(dirname "$0")/../.."
. contrib/bench/common.sh

quick=0 keep=0 out="" vmback="" readahead=""
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1 ;;
    --keep) keep=1 ;;
    --out) out=$2; shift ;;
    --vmback) vmback=$(realpath "$2"); shift ;;
    --readahead) readahead=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$(id -u)" -ne 0 ]; then
  echo "run.sh: needs root (it drops the page cache through /proc/sys/vm/drop_caches)" >&2
  exit 2
fi

if [ $quick = 1 ]; then
  SIZE=512M REPS=2 NRAND=300
else
  SIZE=2G REPS=5 NRAND=1000
fi
INCS=3                  # incrementals on top of the full, for the big images
CAT_DOMAINS=10 CAT_POINTS=50 BIG_POINTS=500

bash contrib/install-deps.sh   # fuse3 (fusermount3), util-linux (mountpoint)
if [ -z "$vmback" ]; then
  cargo build --release --quiet --bin vmback
  vmback=$PWD/target/release/vmback
fi
cargo build --release --quiet --example gen_chain --example lz4_baseline --example bench_io
ex=$PWD/target/release/examples

work=${VMBACK_BENCH_DIR:-$(mktemp -d /tmp/vmback-bench.XXXXXX)}
mkdir -p "$work"
mnt=$work/mnt
mkdir -p "$mnt"
if [ -z "$out" ] && [ $keep = 1 ]; then out=$work/results.md; fi
vlog=$work/vmback.log
vm_pid=""

cleanup() {
  if [ -n "$vm_pid" ] && kill -0 "$vm_pid" 2>/dev/null; then
    kill -TERM "$vm_pid"
    wait "$vm_pid" 2>/dev/null || true
  fi
  if mountpoint -q "$mnt" 2>/dev/null; then fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt"; fi
  if [ $keep = 0 ]; then rm -rf "$work"; else echo "run.sh: work files kept in $work" >&2; fi
}
trap cleanup EXIT

max() { printf '%s\n' "$@" | sort -g | tail -1; }
min() { printf '%s\n' "$@" | sort -g | head -1; }

# start_mount SOURCE [vmback mount options]: mounts on $mnt, sets vm_pid.
start_mount() {
  "$vmback" mount "$1" "$mnt" "${@:2}" 2>>"$vlog" &
  vm_pid=$!
  for _ in $(seq 800); do
    if mountpoint -q "$mnt"; then
      if [ -n "$readahead" ]; then echo "$readahead" >"/sys/class/bdi/$(mountpoint -d "$mnt")/read_ahead_kb"; fi
      return 0
    fi
    kill -0 "$vm_pid" 2>/dev/null || break
    sleep 0.025
  done
  echo "run.sh: vmback mount $1 failed; its log:" >&2
  tail -20 "$vlog" >&2
  exit 1
}
stop_mount() {
  kill -TERM "$vm_pid"
  wait "$vm_pid" || true
  vm_pid=""
}
hwm_mib() { awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/$vm_pid/status"; }

# ---------------------------------------------------------------- machine
machine() {
  local cpu mem fs
  cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
  mem=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
  fs=$(df -T "$work" | awk 'NR == 2 { print $2 " on " $1 }')
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- command: \`bash contrib/bench/run.sh$([ $quick = 1 ] && echo ' --quick')\`"
  echo "- vmback: $vmback ($(git describe --always --dirty 2>/dev/null || echo unknown)), $(rustc --version)"
  echo "- FUSE readahead: ${readahead:-kernel default (128)} KiB"
  echo "- machine: $(uname -sr), $cpu, $(nproc) cores, $mem RAM, work dir $fs"
  echo "- vmback mount defaults: $(( $(nproc) * 2 > 16 ? 16 : $(nproc) * 2 )) FUSE threads, --cache-size 256M"
  echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
}
machine_info=$(machine)

# ---------------------------------------------------------------- data
log "generating data in $work ($SIZE images, $INCS incrementals each)"
truth_dir=$work/truth
"$ex/gen_chain" --out "$work/plain" --size "$SIZE" --incrementals $INCS --truth-dir "$truth_dir" 2>&1 | sed 's/^/  /' >&2
"$ex/gen_chain" --out "$work/lz4" --size "$SIZE" --incrementals $INCS --compress 2 2>&1 | sed 's/^/  /' >&2
truth=$truth_dir/sda.virtnbdbackup.$INCS.raw
chain() { echo "$1/sda.full.data"; for i in $(seq $INCS); do echo "$1/sda.inc.virtnbdbackup.$i.data"; done; }
for d in $(seq 0 $((CAT_DOMAINS - 1))); do
  "$ex/gen_chain" --out "$work/cat10x50/vm$d" --size 64M --incrementals $((CAT_POINTS - 1)) \
    --inc-ranges 16 --inc-max-len 64K --domain "vm$d" --seed $((d + 10)) 2>/dev/null
done
"$ex/gen_chain" --out "$work/cat1x500/set" --size 64M --incrementals $((BIG_POINTS - 1)) \
  --inc-ranges 16 --inc-max-len 64K --domain big-vm --seed 99 2>/dev/null
img=$mnt/bench-vm/latest/sda.raw
image_bytes=$(stat -c %s "$truth")

# ---------------------------------------------------------------- sequential
log "sequential reads, best of $REPS"
seq_read() { "$ex/bench_io" seq "$1"; }
declare -a t_cold t_warm t_small p_cold p_second c_cold c_second c_backing hwm_p hwm_c
for r in $(seq $REPS); do
  drop_caches
  t_cold+=("$(kv mbps "$(seq_read "$truth")")")
  t_warm+=("$(kv mbps "$(seq_read "$truth")")")
  # The same cached read from 4 KiB folios, the only size the FUSE page cache uses here.
  t_small+=("$(kv mbps "$("$ex/bench_io" seq "$truth" --small-pages)")")

  drop_caches
  start_mount "$work/plain"
  p_cold+=("$(kv mbps "$(seq_read "$img")")")
  p_second+=("$(kv mbps "$(seq_read "$img")")")
  hwm_p+=("$(hwm_mib)")
  stop_mount

  drop_caches
  start_mount "$work/lz4"
  c_cold+=("$(kv mbps "$(seq_read "$img")")")
  c_second+=("$(kv mbps "$(seq_read "$img")")")
  hwm_c+=("$(hwm_mib)")
  stop_mount

  # Fresh mount, stream files still in the page cache: the decode path alone.
  start_mount "$work/lz4"
  c_backing+=("$(kv mbps "$(seq_read "$img")")")
  stop_mount
  log "  rep $r: truth ${t_cold[-1]}/${t_warm[-1]}, plain ${p_cold[-1]}/${p_second[-1]}, lz4 ${c_cold[-1]}/${c_second[-1]} (backing cached ${c_backing[-1]}) MB/s"
done

log "lz4_flex baseline"
mapfile -t lz4_chain < <(chain "$work/lz4")
lz4=$("$ex/lz4_baseline" "${lz4_chain[@]}" --repeat 3)
log "  $lz4"
lz4_secs=$(kv secs "$lz4")
lz4_img_mbps=$(calc "$image_bytes / $lz4_secs / 1e6")

log "peak RSS with --cache-size 64M"
drop_caches
start_mount "$work/plain" --cache-size 64M
seq_read "$img" >/dev/null
hwm_p64=$(hwm_mib)
stop_mount
drop_caches
start_mount "$work/lz4" --cache-size 64M
seq_read "$img" >/dev/null
hwm_c64=$(hwm_mib)
stop_mount

# ---------------------------------------------------------------- random
log "random 4 KiB reads ($NRAND per case)"
rand_read() { "$ex/bench_io" rand "$1" --map "$truth" --n $NRAND --seed "$2"; }
declare -A R   # R[<set>_<case>]: a bench_io rand line
drop_caches
R[truth_cold]=$(rand_read "$truth" 1)
R[truth_warm]=$(rand_read "$truth" 1)
for set in plain lz4; do
  drop_caches
  start_mount "$work/$set"
  R[${set}_cold]=$(rand_read "$img" 1)
  R[${set}_warm]=$(rand_read "$img" 1)
  stop_mount
  # Stream files cached, fresh mount, new offsets: FUSE + vmback without the disk.
  cat "$work/$set"/*.data >/dev/null
  start_mount "$work/$set"
  R[${set}_backing]=$(rand_read "$img" 2)
  stop_mount
done

# ---------------------------------------------------------------- catalogs
log "mount + ls -lR of 500 restore points"
declare -A LS ML   # LS[<catalog>_cold|warm]: ls -lR of the folder; ML: mount + ls -lR
for cat in cat10x50 cat1x500; do
  drop_caches
  LS[${cat}_cold]=$("$ex/bench_io" lsr "$work/$cat")
  LS[${cat}_warm]=$("$ex/bench_io" lsr "$work/$cat")
  drop_caches
  ML[${cat}_cold]=$("$ex/bench_io" mountls "$vmback" "$work/$cat" "$mnt" 2>>"$vlog")
  warm=()
  for _ in 1 2 3; do warm+=("$(kv total_secs "$("$ex/bench_io" mountls "$vmback" "$work/$cat" "$mnt" 2>>"$vlog")")"); done
  ML[${cat}_warm]=$(min "${warm[@]}")
done

# ---------------------------------------------------------------- verify
log "verifying the mounted images against the truth image"
for set in plain lz4; do
  start_mount "$work/$set"
  if ! cmp -s "$img" "$truth"; then
    stop_mount
    echo "run.sh: $set image differs from $truth: the numbers above are void" >&2
    exit 1
  fi
  stop_mount
done

# ---------------------------------------------------------------- table
# row NAME BASELINE_TEXT VMBACK_TEXT RATIO TARGET_TEXT MEETS
row() { echo "| $1 | $2 | $3 | $4 | $5 | $6 |"; }
meets() { awk "BEGIN { print ($1) ? \"yes\" : \"no\" }"; }
ratio_ge() { local r; r=$(calc "$1 / $2"); echo "$r|≥ $3×|$(meets "$r >= $3")"; }
ratio_le() { local r; r=$(calc "$1 / $2"); echo "$r|≤ $3×|$(meets "$r <= $3")"; }
info_ratio() { echo "$(calc "$1 / $2")|—|—"; }
emit() { local name=$1 base=$2 vm=$3 rest=$4; IFS='|' read -r ratio target ok <<<"$rest"; row "$name" "$base" "$vm" "$ratio" "$target" "$ok"; }

tc=$(max "${t_cold[@]}") tw=$(max "${t_warm[@]}") tsm=$(max "${t_small[@]}")
pc=$(max "${p_cold[@]}") ps=$(max "${p_second[@]}")
cc=$(max "${c_cold[@]}") cs=$(max "${c_second[@]}") cb=$(max "${c_backing[@]}")
lat() { echo "$(kv p50_us "$1") / $(kv p99_us "$1") µs"; }
# latrow LABEL cold|warm KEY: a random-read row; the baseline is the truth file cold or cached.
latrow() {
  local b=${R[truth_$2]} v=${R[$3]} bl
  bl=$([ "$2" = cold ] && echo "truth, cold" || echo "truth, cached")
  emit "Random 4 KiB p50 / p99, $1" "$(lat "$b") ($bl)" "$(lat "$v")" \
    "$(calc "$(kv p50_us "$v") / $(kv p50_us "$b")") / $(calc "$(kv p99_us "$v") / $(kv p99_us "$b")")|—|—"
}
hp=$(max "${hwm_p[@]}") hc=$(max "${hwm_c[@]}")
size_label=$([ $quick = 1 ] && echo "512 MiB" || echo "2 GiB")

table() {
  echo "### Results"
  echo
  echo "$machine_info"
  echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- images: $size_label virtual, full (~50% data) + $INCS incrementals; plain data $(du -sm "$work/plain" | cut -f1) MiB of stream files, lz4 $(du -sm "$work/lz4" | cut -f1) MiB"
  echo "- throughput: best of $REPS runs, MB = 10^6 bytes; latency: $NRAND reads per case"
  echo
  echo "| Measurement | Baseline | vmback | Ratio | Target | Meets |"
  echo "|---|---|---|---|---|---|"
  emit "Seq. first read, plain, caches dropped (MB/s)" "$tc (truth file, cold)" "$pc" "$(ratio_ge "$pc" "$tc" 0.5)"
  emit "Seq. second read, plain (MB/s)" "$tw (truth file, cached)" "$ps" "$(ratio_ge "$ps" "$tw" 0.9)"
  emit "Seq. second read, plain, against 4 KiB page cache (MB/s)" "$tsm (truth file, cached in 4 KiB folios)" "$ps" "$(info_ratio "$ps" "$tsm")"
  emit "Seq. first read, lz4, caches dropped (MB/s of image)" "$lz4_img_mbps (lz4_flex, 1 thread)" "$cc" "$(ratio_ge "$cc" "$lz4_img_mbps" 0.8)"
  emit "Seq. first read, lz4, stream files cached (MB/s of image)" "$lz4_img_mbps (lz4_flex, 1 thread)" "$cb" "$(ratio_ge "$cb" "$lz4_img_mbps" 0.8)"
  emit "Seq. second read, lz4 (MB/s)" "$tw (truth file, cached)" "$cs" "$(info_ratio "$cs" "$tw")"
  local set label
  for set in plain lz4; do
    latrow "$set, cold" cold "${set}_cold"
    latrow "$set, warm (same offsets again)" warm "${set}_warm"
    latrow "$set, fresh mount, stream files cached" warm "${set}_backing"
  done
  local cat cold warm lc lw
  for cat in cat10x50 cat1x500; do
    label=$([ $cat = cat10x50 ] && echo "10 domains × 50 points" || echo "1 set, 500 points")
    cold=${ML[${cat}_cold]} warm=${ML[${cat}_warm]}
    lc=$(kv ls_secs "${LS[${cat}_cold]}") lw=$(kv ls_secs "${LS[${cat}_warm]}")
    emit "Mount + \`ls -lR\`, $label, caches dropped (s)" "$lc (\`ls -lR\` of the folder, cold)" \
      "$(kv total_secs "$cold") (mount $(kv mount_secs "$cold"), ls $(kv ls_secs "$cold"))" \
      "$(calc "$(kv total_secs "$cold") / $lc")|< 1 s|$(meets "$(kv total_secs "$cold") < 1")"
    emit "Mount + \`ls -lR\`, $label, cached (s)" "$lw (\`ls -lR\` of the folder)" "$warm" \
      "$(calc "$warm / $lw")|< 1 s|$(meets "$warm < 1")"
  done
  emit "Peak RSS, plain, reading $size_label, --cache-size 256M (MiB)" "320 (cache + 64)" "$hp" "$(ratio_le "$hp" 320 1.0)"
  emit "Peak RSS, lz4, reading $size_label, --cache-size 256M (MiB)" "320 (cache + 64)" "$hc" "$(ratio_le "$hc" 320 1.0)"
  emit "Peak RSS, plain, reading $size_label, --cache-size 64M (MiB)" "128 (cache + 64)" "$hwm_p64" "$(ratio_le "$hwm_p64" 128 1.0)"
  emit "Peak RSS, lz4, reading $size_label, --cache-size 64M (MiB)" "128 (cache + 64)" "$hwm_c64" "$(ratio_le "$hwm_c64" 128 1.0)"
  echo
  echo "Raw runs (MB/s): truth cold ${t_cold[*]}; truth cached ${t_warm[*]}; truth cached in 4 KiB folios ${t_small[*]}; plain first ${p_cold[*]}; plain second ${p_second[*]}; lz4 first ${c_cold[*]}; lz4 second ${c_second[*]}; lz4 first, stream files cached ${c_backing[*]}."
  echo "lz4_baseline: $lz4"
  echo
  echo "Compressed, read literally (vmback MB/s of image over lz4_flex MB/s of decoded output, \
$(kv mbps "$lz4") MB/s): first read $(calc "$cc / $(kv mbps "$lz4")")× with caches dropped, \
$(calc "$cb / $(kv mbps "$lz4")")× with stream files cached. The table's ratio instead compares times for the \
same output (image bytes / decode time), since $(calc "100 - 100 * $(kv data_bytes "$lz4") / $image_bytes")% \
of the image is holes that need no decoding."
}
if [ -n "$out" ]; then
  table | tee "$out"
  log "table written to $out"
else
  table
fi
