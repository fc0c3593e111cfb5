#!/usr/bin/env bash
# Soak: `vmback mount` of a copy of the real corpus (contrib/realstack/make-corpus.sh)
# under load for DURATION_SECONDS, checking every byte read against the corpus's truth
# images. Issue 7, part 5.
#
#   contrib/soak.sh DURATION_SECONDS [--expect-refresh|--no-expect-refresh]
#
# Load (contrib/soak-load.py): 8 readers (random and sequential) across the images, 2
# writers into overlays (each checking its own writes read back), an `ls -lR` loop, and a
# backup landing in SOURCE a third of the way in: the corpus's `plain` set copied in as the
# backups of another domain (its saved domain XML and .cpt renamed, so no point the load
# reads is renamed), each file first written as `NAME.partial` and then renamed, as
# virtnbdbackup does. Its points appear in the mount only with live catalog refresh (and
# the readers then read them too). The run fails unless they appear within REFRESH_WAIT s
# when refresh is expected: by default when `vmback mount --help` offers `--rescan`.
#
# Records the mount's RSS and open fds every SAMPLE_EVERY s (CSV), prints a summary and
# exits non-zero on any mismatch, error, panic, fd leak, or backup file whose sha256
# changed.
#
# Environment: VMBACK_CORPUS (default /var/tmp/vmback-corpus), VMBACK_BIN (default
# target/debug/vmback, built if missing), SOAK_OUT (results folder, default
# /var/tmp/vmback-soak-results).
set -euo pipefail
cd "$(dirname "$0")/.."

duration=${1:?usage: contrib/soak.sh DURATION_SECONDS [--expect-refresh|--no-expect-refresh]}
expect_refresh=auto
case ${2:-} in
  --expect-refresh) expect_refresh=yes ;;
  --no-expect-refresh) expect_refresh=no ;;
esac
corpus=${VMBACK_CORPUS:-/var/tmp/vmback-corpus}
bin=${VMBACK_BIN:-target/debug/vmback}
out=${SOAK_OUT:-/var/tmp/vmback-soak-results}
# Seconds between RSS/fd samples: a 30-minute run gives 360 rows, enough for a curve.
SAMPLE_EVERY=5
# Seconds to wait for the landed backup's points to appear (a refresh by inotify or a
# periodic rescan is expected well within this).
REFRESH_WAIT=60
# The domain of the corpus (make-corpus.sh), and the one the landed backup is of.
DOMAIN=vmback-test
LANDED=vmback-landed

[[ -f $corpus/manifest.tsv ]] || {
  echo "no corpus at $corpus: run contrib/realstack/make-corpus.sh $corpus" >&2
  exit 2
}
[[ -x $bin ]] || cargo build --quiet
bin=$(realpath "$bin")
if [[ $expect_refresh == auto ]]; then
  expect_refresh=no
  "$bin" mount --help | grep -q -- --rescan && expect_refresh=yes
fi
mkdir -p "$out"
work=$(mktemp -d /var/tmp/vmback-soak.XXXXXX)
mnt=$work/mnt
mount_pid=
bg_pids=()
cleanup() {
  for p in "${bg_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [[ -n $mount_pid ]] && kill -0 "$mount_pid" 2>/dev/null; then
    kill -TERM "$mount_pid" 2>/dev/null || true
    wait "$mount_pid" 2>/dev/null || true
  fi
  # Also clears the mount a killed vmback left (mountpoint(1) fails on it: ENOTCONN).
  fusermount3 -uz "$mnt" 2>/dev/null || true
  if grep -q " $mnt " /proc/mounts; then
    echo "$mnt is still mounted; leaving $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

mkdir -p "$work/source" "$mnt" "$work/overlays"
cp -a "$corpus/sets/." "$work/source/"
# Backup files must stay byte-identical under the load (the landed set is checked apart).
sums() { (cd "$work/source" && find . -path "./$LANDED" -prune -o -type f -print0 | sort -z | xargs -0 sha256sum); }
sums >"$work/sums.before"
touch "$work/remap"

VMBACK_LOG=info "$bin" mount --overlay-dir "$work/overlays" "$work/source" "$mnt" 2>"$out/mount.log" &
mount_pid=$!
for _ in $(seq 100); do
  mountpoint -q "$mnt" && break
  kill -0 "$mount_pid" 2>/dev/null || { cat "$out/mount.log" >&2; exit 1; }
  sleep 0.2
done
mountpoint -q "$mnt" || { echo "the mount did not come up" >&2; exit 1; }

# 0 once the mount process is gone (the summary then reports its exit status).
fds() { ls "/proc/$mount_pid/fd" 2>/dev/null | wc -l || true; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$mount_pid/status" 2>/dev/null || echo 0; }
fds_before=$(fds)

echo "seconds,rss_kib,fds" >"$out/soak.csv"
start=$(date +%s)
(
  while kill -0 "$mount_pid" 2>/dev/null; do
    echo "$(($(date +%s) - start)),$(rss_kib),$(fds)" >>"$out/soak.csv"
    sleep "$SAMPLE_EVERY"
  done
) &
bg_pids+=($!)

(
  n=0 bad=0
  end=$((start + duration))
  while (($(date +%s) < end)); do
    ls -lR "$mnt" >/dev/null 2>"$work/ls.err" || { bad=$((bad + 1)); cat "$work/ls.err" >>"$work/ls.errors"; }
    n=$((n + 1))
  done
  echo "$n $bad" >"$work/ls.count"
) &
ls_pid=$!

python3 contrib/soak-load.py --mnt "$mnt" --source "$work/source" --corpus "$corpus" --vmback "$bin" \
  --seconds "$duration" --remap "$work/remap" --alias "$LANDED:plain" >"$out/load.json" &
load_pid=$!

# The backup landing, a third of the way in.
sleep $((duration / 3))
land=$work/source/$LANDED
mkdir "$land"
for f in "$corpus/sets/plain"/*; do
  name=$(basename "$f")
  if [[ -d $f ]]; then
    cp -a "$f" "$land/$name"
    continue
  fi
  case $name in
    *.cpt) name=$LANDED.cpt ;;
  esac
  if [[ $name == vmconfig.*.xml ]]; then
    sed "s|<name>$DOMAIN</name>|<name>$LANDED</name>|" "$f" >"$land/$name.partial"
  else
    cp "$f" "$land/$name.partial"
  fi
  mv "$land/$name.partial" "$land/$name"
done
touch "$work/remap"
landed_at=$(($(date +%s) - start))
new_points=no
for _ in $(seq $((REFRESH_WAIT * 5))); do
  if [[ -d $mnt/$LANDED ]]; then
    new_points=yes
    touch "$work/remap"
    break
  fi
  (($(date +%s) - start < duration)) || break
  sleep 0.2
done

wait "$load_pid" || true
wait "$ls_pid" || true
fds_after=$(fds)
# The mount's own counters: how much of the load reached vmback past the page cache.
cat "$mnt/.stats" >"$out/stats.txt" 2>/dev/null || true
points_after=$(ls "$mnt/$LANDED" 2>/dev/null | grep -vc '^latest$' || true)
rss_end=$(rss_kib)
kill -TERM "$mount_pid" 2>/dev/null || true
mount_status=0
wait "$mount_pid" || mount_status=$?
mount_pid=
for p in "${bg_pids[@]}"; do kill "$p" 2>/dev/null || true; done
bg_pids=()

read -r ls_runs ls_bad <"$work/ls.count"
sums >"$work/sums.after"
changed=$(diff "$work/sums.before" "$work/sums.after" | grep -c '^[<>]' || true)
panics=$(grep -c -i 'panicked' "$out/mount.log" || true)
warnings=$(grep -c -E ' (WARN|ERROR) ' "$out/mount.log" || true)
export ls_runs ls_bad fds_before fds_after points_after LANDED landed_at new_points \
  expect_refresh mount_status panics warnings changed rss_end duration out mnt
fail=0
python3 - <<'EOF' | tee "$out/summary.txt" || fail=1
import csv, json, os
e = os.environ
load = json.load(open(os.path.join(e["out"], "load.json")))
rows = list(csv.DictReader(open(os.path.join(e["out"], "soak.csv"))))
rss = [int(r["rss_kib"]) for r in rows if r["rss_kib"]]
fds = [int(r["fds"]) for r in rows if r["fds"]]
q = len(rss) // 4 or 1
mib = lambda k: f"{k / 1024:.1f} MiB"
print(f"soak: {e['duration']} s, {load['images']} images at the start, {load['images_at_end']} at the end, writers on {', '.join(os.path.relpath(p, e['mnt']) for p in load['writer_images'])}")
print(f"  bytes checked   {load['bytes_checked']:,} ({load['ops']:,} operations), bytes written {load['bytes_written']:,}")
print(f"  mismatches      {load['mismatches']}")
print(f"  errors          {load['errors']} (workers that died: {load['crashed_workers']}); ls -lR runs {e['ls_runs']}, failed {e['ls_bad']}")
print(f"  RSS             min {mib(min(rss))}, max {mib(max(rss))}; mean of first quarter {mib(sum(rss[:q]) / q)}, of last quarter {mib(sum(rss[-q:]) / q)}; at the end {mib(int(e['rss_end']))}")
secs = [int(r["seconds"]) for r in rows if r["rss_kib"]]
curve = [f"{secs[i * (len(rss) - 1) // 10]}s {rss[i * (len(rss) - 1) // 10] / 1024:.0f}" for i in range(11)]
print(f"  RSS curve (MiB) {', '.join(curve)}")
print(f"  open fds        before load {e['fds_before']}, after load {e['fds_after']} (max during {max(fds)})")
print(f"  landed backup   at {e['landed_at']} s; its points in the mount: {e['points_after']} under {e['LANDED']}/ (seen: {e['new_points']}, required: {e['expect_refresh']})")
stats = open(os.path.join(e["out"], "stats.txt")).read().split("\n") if os.path.exists(os.path.join(e["out"], "stats.txt")) else []
print(f"  mount .stats    {'; '.join(l for l in stats if l)}")
print(f"  backup files    {e['changed']} sha256 lines differ after the run")
print(f"  mount           exit status {e['mount_status']}, panics in its log {e['panics']}, warnings and errors {e['warnings']}")
for p in load["problems"]:
    print("  problem:", p)
print(f"  files           {e['out']}/soak.csv, load.json, mount.log")
raise SystemExit(1 if load["mismatches"] or load["errors"] or load["crashed_workers"] else 0)
EOF

((ls_bad == 0)) || { head -20 "$work/ls.errors" >&2; fail=1; }
((changed == 0)) || { diff "$work/sums.before" "$work/sums.after" | head -20 >&2; fail=1; }
((panics == 0 && mount_status == 0)) || fail=1
# Every fd the load opened is closed again once it stops: no leak. The mount holds each
# data file open, so a refreshed catalog may add one per landed data file.
allowed=$fds_before
[[ $new_points == yes ]] && allowed=$((fds_before + $(ls "$corpus/sets/plain"/*.data | wc -l)))
((fds_after <= allowed)) || { echo "fd leak: $fds_before before, $fds_after after" >&2; fail=1; }
if [[ $expect_refresh == yes && $new_points == no ]]; then
  echo "the landed backup's points did not appear within $REFRESH_WAIT s" >&2
  fail=1
fi
exit $fail
