# shellcheck shell=bash
# Shared by the benchmark scripts (sourced, not run): logging, dropping the page cache,
# small number helpers, and the options backup.sh and restore.sh both take.

log() { echo "[$(date +%T)] $*" >&2; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# warm_memory: writes and frees 2 GiB of tmpfs, so the next run's page-cache pages come
# from recently touched memory. In this VM the first write into never-touched memory costs
# up to 10x more (1 GiB into the page cache: 2.5 s of CPU cold, 0.25 s warm), so without
# this a run's time depends on what the run before it happened to touch.
warm_memory() {
  local f=/dev/shm/vmback-bench-warm.$$
  head -c 2G /dev/zero >"$f" 2>/dev/null || true
  rm -f "$f"
}
# kv KEY LINE: the value of KEY in a `k=v k=v` line.
kv() { sed -n "s/.*\(^\| \)$1=\([^ ]*\).*/\2/p" <<<"$2"; }
# calc EXPR: awk arithmetic, 2 decimals.
calc() { awk "BEGIN { printf \"%.2f\", $1 }"; }

# timed CMD...: warms free memory, drops the caches, runs CMD with its output appended to the caller's $log
# (failing through the caller's `die`), and prints its wall time in seconds.
# shellcheck disable=SC2154  # log is the sourcing script's
timed() {
  local t0 t1
  warm_memory
  drop_caches
  t0=$EPOCHREALTIME
  echo "+ $*" >>"$log"
  "$@" >>"$log" 2>&1 || die "failed: $* (see $log)"
  t1=$EPOCHREALTIME
  calc "$t1 - $t0"
}

# bench_args SCRIPT WHY_ROOT ARGS...: parses --quick, --keep, --reps N, --out FILE and
# --help (the script's header comment) into quick, keep, reps and out, and refuses to run
# without root (WHY_ROOT says what needs it).
# shellcheck disable=SC2034  # quick, keep and out are read by the sourcing script
bench_args() {
  local script=$1 why=$2
  shift 2
  quick=0 keep=0 out="" reps=3
  while [ $# -gt 0 ]; do
    case $1 in
      --quick) quick=1 ;;
      --keep) keep=1 ;;
      --reps) reps=$2; shift ;;
      --out) out=$2; shift ;;
      -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "contrib/bench/$script"; exit 0 ;;
      *) echo "$script: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
  done
  if [ "$(id -u)" -ne 0 ]; then
    echo "$script: needs root ($why)" >&2
    exit 2
  fi
  [ "$reps" -ge 1 ] 2>/dev/null || { echo "$script: --reps wants a number >= 1" >&2; exit 2; }
}
