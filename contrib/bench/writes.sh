#!/usr/bin/env bash
# vmback write benchmark: bash contrib/bench/writes.sh [--size 1G] [--ops 20000] [--keep]
#
# Mounts a generated backup set (examples/gen_chain.rs, one --size disk, lz4) with
# target/release/vmback and measures writes into the overlay of its image, each against
# the same operations, in the same run, on a plain sparse file of the same size on
# /var/tmp:
#   - random 4 KiB writes (page-aligned, seeded offsets), buffered then fsync, and
#     O_DIRECT: IOPS;
#   - stat() right after a write, and lseek(SEEK_DATA/SEEK_HOLE), once those writes left
#     many extents (what `du`, `cp --sparse` and `qemu-img convert` pay per call), and
#     the whole SEEK_DATA/SEEK_HOLE walk `cp --sparse` does (stopped after 20 s);
#   - a sequential write of the whole image in 1 MiB requests, then fsync: MB/s (past
#     --dirty-size this spills into the overlay file), and its slowest single request
#     (a spill holds the image's lock while it writes the overlay file);
#   - sequential read-back of the whole image (page cache dropped first): MB/s, and random
#     4 KiB O_DIRECT reads: IOPS;
#   - peak RSS (VmHWM) of vmback over the whole load, against --dirty-size +
#     --cache-size + 64 MiB; the image is read once before the writes, so the lz4 cache
#     is full when they start.
# The I/O is done by a small python3 script (os.pwrite/os.pread, O_DIRECT through an
# mmap-aligned buffer), one process, queue depth 1. Prints a markdown table.
#
# Needs root (drops the page cache) and /dev/fuse. Work files go to a new
# /var/tmp/vmback-bench-writes.XXXXXX (about 2 x --size), removed unless --keep.
set -euo pipefail
cd "$(dirname "$0")/../.."
. contrib/bench/common.sh

SIZE=1G OPS=20000 DIRTY=256M CACHE=256M keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --size) SIZE=$2; shift ;;
    --ops) OPS=$2; shift ;;
    --dirty-size) DIRTY=$2; shift ;;
    --cache-size) CACHE=$2; shift ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "writes.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$(id -u)" -ne 0 ]; then
  echo "writes.sh: needs root (it drops the page cache through /proc/sys/vm/drop_caches)" >&2
  exit 2
fi
for c in python3 fusermount3 mountpoint; do
  command -v $c >/dev/null || { echo "writes.sh: $c is not installed" >&2; exit 2; }
done

cargo build --release --quiet --bin vmback --example gen_chain
vmback=$PWD/target/release/vmback
ex=$PWD/target/release/examples

work=$(mktemp -d /var/tmp/vmback-bench-writes.XXXXXX)
mnt=$work/mnt ovl=$work/ovl vlog=$work/vmback.log
mkdir -p "$mnt" "$ovl"
vm_pid=""
cleanup() {
  if [ -n "$vm_pid" ] && kill -0 "$vm_pid" 2>/dev/null; then
    kill -TERM "$vm_pid"
    wait "$vm_pid" 2>/dev/null || true
  fi
  if mountpoint -q "$mnt" 2>/dev/null; then fusermount3 -uz "$mnt" 2>/dev/null || umount -l "$mnt"; fi
  if [ $keep = 0 ]; then rm -rf "$work"; else echo "writes.sh: work files kept in $work" >&2; fi
}
trap cleanup EXIT
to_mib() { numfmt --from=iec "$1" | awk '{ printf "%d", $1 / 1048576 }'; }

cat >"$work/io.py" <<'EOF'
# io.py OP FILE [N]: one measurement on FILE; prints k=v pairs.
import mmap, os, random, sys, time

op, path = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 0
size = os.stat(path).st_size
PAGE, MIB = 4096, 1 << 20

def offsets(seed, count):
    r = random.Random(seed)
    return [r.randrange(size // PAGE) * PAGE for _ in range(count)]

def aligned(length, fill):
    m = mmap.mmap(-1, length)
    m.write(fill[:length])
    return m

if op == "randwrite":          # buffered, then fsync; timed together
    fd = os.open(path, os.O_RDWR)
    buf = os.urandom(PAGE)
    offs = offsets(1, n)
    t = time.perf_counter()
    for o in offs:
        os.pwrite(fd, buf, o)
    os.fsync(fd)
    dt = time.perf_counter() - t
    print(f"iops={n / dt:.0f} secs={dt:.2f}")
elif op == "randwrite_direct":
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    buf = aligned(PAGE, os.urandom(PAGE))
    offs = offsets(2, n)
    t = time.perf_counter()
    for o in offs:
        os.pwrite(fd, buf, o)
    dt = time.perf_counter() - t
    print(f"iops={n / dt:.0f} secs={dt:.2f}")
elif op == "meta":             # stat right after a write (attributes invalidated), lseek
    fd = os.open(path, os.O_RDWR)
    stat_s = 0.0
    for o in offsets(5, n):
        os.pwrite(fd, b"x", o)
        t = time.perf_counter()
        os.stat(path)
        stat_s += time.perf_counter() - t
    stat_us = stat_s / n * 1e6
    r = random.Random(3)
    t = time.perf_counter()
    for _ in range(n):
        o = r.randrange(size)
        try:
            os.lseek(fd, o, os.SEEK_DATA)
        except OSError:
            pass
        os.lseek(fd, o, os.SEEK_HOLE)
    seek_us = (time.perf_counter() - t) / (2 * n) * 1e6
    # The full SEEK_DATA/SEEK_HOLE walk `cp --sparse` does, stopped after 20 s.
    pos, extents, t = 0, 0, time.perf_counter()
    while pos < size and time.perf_counter() - t < 20:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        pos = os.lseek(fd, d, os.SEEK_HOLE)
        extents += 1
    walk = time.perf_counter() - t
    done = pos >= size or walk < 20
    print(f"stat_us={stat_us:.1f} seek_us={seek_us:.1f} walk_s={walk:.2f} walk_extents={extents} walk_done={int(done)} walk_frac={pos / size:.4f}")
elif op == "seqwrite":         # the whole file, 1 MiB requests, then fsync
    fd = os.open(path, os.O_RDWR)
    buf = os.urandom(MIB)
    t, worst = time.perf_counter(), 0.0
    for o in range(0, size, MIB):
        w = time.perf_counter()
        os.pwrite(fd, buf[: min(MIB, size - o)], o)
        worst = max(worst, time.perf_counter() - w)
    os.fsync(fd)
    dt = time.perf_counter() - t
    print(f"mbps={size / dt / 1e6:.0f} secs={dt:.2f} worst_ms={worst * 1e3:.0f}")
elif op == "seqread":           # the whole file, 1 MiB reads
    fd = os.open(path, os.O_RDONLY)
    t, got = time.perf_counter(), 0
    while True:
        b = os.read(fd, MIB)
        if not b:
            break
        got += len(b)
    dt = time.perf_counter() - t
    print(f"mbps={got / dt / 1e6:.0f} secs={dt:.2f}")
elif op == "randread_direct":
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = aligned(PAGE, bytes(PAGE))
    offs = offsets(4, n)
    t = time.perf_counter()
    for o in offs:
        os.preadv(fd, [buf], o)
    dt = time.perf_counter() - t
    print(f"iops={n / dt:.0f} secs={dt:.2f}")
EOF
io() { python3 "$work/io.py" "$@"; }

# ---------------------------------------------------------------- data and mount
log "generating a $SIZE backup set in $work"
"$ex/gen_chain" --out "$work/set" --size "$SIZE" --incrementals 1 --compress 2 2>&1 | sed 's/^/  /' >&2
"$vmback" mount --dirty-size "$DIRTY" --cache-size "$CACHE" --overlay-dir "$ovl" "$work/set" "$mnt" 2>>"$vlog" &
vm_pid=$!
for _ in $(seq 400); do
  mountpoint -q "$mnt" && break
  kill -0 "$vm_pid" 2>/dev/null || { cat "$vlog" >&2; exit 1; }
  sleep 0.025
done
mountpoint -q "$mnt" || { echo "writes.sh: vmback did not mount" >&2; cat "$vlog" >&2; exit 1; }
img=$mnt/bench-vm/latest/sda.raw
plain=$work/plain.raw
image_bytes=$(stat -c %s "$img")
truncate -s "$image_bytes" "$plain"
hwm_mib() { awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/$vm_pid/status"; }
rss0=$(hwm_mib)
log "reading the image once (fills the lz4 cache up to --cache-size)"
io seqread "$img" >/dev/null
rss_read=$(hwm_mib)

declare -A R
measure() { # measure NAME OP [N]: runs OP on both files into R[NAME.plain] / R[NAME.vmback]
  local name=$1; shift
  local op=$1; shift
  for target in plain vmback; do
    local f=$plain
    [ $target = vmback ] && f=$img
    case $op in seqread) drop_caches ;; esac
    R[$name.$target]=$(io "$op" "$f" "$@")
    log "$name $target: ${R[$name.$target]}"
  done
}

log "random 4 KiB writes ($OPS each)"
measure randw randwrite "$OPS"
dirty_after_rand=$(awk '/^dirty_bytes/ { printf "%.0f", $2 / 1048576 }' "$mnt/.stats")
measure meta meta 50
measure randwd randwrite_direct "$OPS"
log "sequential write of the whole image"
measure seqw seqwrite
log "read-back"
measure seqr seqread
measure randr randread_direct "$((OPS / 4))"
rss=$(hwm_mib)
limit=$(( $(to_mib "$DIRTY") + $(to_mib "$CACHE") + 64 ))
spilled=$(du -sm "$ovl" | cut -f1)

# ---------------------------------------------------------------- table
row() { # row WHAT KEY NAME UNIT BETTER(higher|lower)
  local p v
  p=$(kv "$2" "${R[$3.plain]}") v=$(kv "$2" "${R[$3.vmback]}")
  printf '| %s | %s %s | %s %s | %s |\n' "$1" "$v" "$4" "$p" "$4" "$(calc "$v / $p")x"
}
{
  echo "vmback write benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -r), $(nproc) cores,"
  echo "$(git describe --always --dirty 2>/dev/null || echo unknown); image $SIZE (\`--dirty-size $DIRTY --cache-size $CACHE\`),"
  echo "plain file on $(df -T "$work" | awk 'NR == 2 { print $2 " " $1 }'); python3 pwrite/pread, queue depth 1; load $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
  echo "| measurement | vmback overlay | plain file | ratio |"
  echo "|---|---|---|---|"
  row "random 4 KiB writes, buffered + fsync ($OPS)" iops randw IOPS
  row "random 4 KiB writes, O_DIRECT ($OPS)" iops randwd IOPS
  row "stat() right after a write, after the random writes" stat_us meta µs
  row "lseek SEEK_DATA/SEEK_HOLE after the random writes" seek_us meta µs
  pw=$(kv walk_s "${R[meta.plain]}") vw=$(kv walk_s "${R[meta.vmback]}")
  pe=$(kv walk_extents "${R[meta.plain]}") ve=$(kv walk_extents "${R[meta.vmback]}")
  vf=$(kv walk_frac "${R[meta.vmback]}")
  vdone=$(kv walk_done "${R[meta.vmback]}")
  note="" vfull=$vw
  if [ "$vdone" != 1 ]; then
    vfull=$(calc "$vw / ($vf > 0 ? $vf : 0.001)")
    note=" (stopped at 20 s, $(calc "$vf * 100")% of the image: ~$vfull s projected)"
  fi
  printf '| full SEEK_DATA/SEEK_HOLE walk | %s s, %s extents%s | %s s, %s extents | %s |\n' \
    "$vw" "$ve" "$note" "$pw" "$pe" "$(calc "$vfull / ($pw > 0 ? $pw : 0.001)")x"
  row "sequential write of the whole image, 1 MiB + fsync" mbps seqw MB/s
  row "slowest single 1 MiB write of that sequence" worst_ms seqw ms
  row "sequential read-back, page cache dropped" mbps seqr MB/s
  row "random 4 KiB reads, O_DIRECT ($((OPS / 4)))" iops randr IOPS
  echo "| vmback peak RSS (VmHWM) over the load | $rss MiB (at mount: $rss0 MiB, after the first read: $rss_read MiB) | limit $limit MiB = dirty + cache + 64 | $(calc "$rss / $limit")x |"
  echo
  echo "dirty_bytes after the random writes: $dirty_after_rand MiB; overlay folder after the load: $spilled MiB."
}
