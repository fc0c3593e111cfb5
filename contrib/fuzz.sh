#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 600), at most
# FUZZ_JOBS at a time (default 1), at low priority so a shared machine stays usable.
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
#
# Each target starts from the small committed seeds in fuzz/corpus/<target> (written by
# vmback's own stream writer and the examples of doc/FORMAT.md) and grows its corpus in
# FUZZ_WORK (default /var/tmp/vmback-fuzz), which is kept between runs. Crashes land in
# fuzz/artifacts/<target>/. Per target, the log is FUZZ_WORK/<target>.log; the summary
# printed at the end gives executions and seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
jobs=${FUZZ_JOBS:-1}
work=${FUZZ_WORK:-/var/tmp/vmback-fuzz}
targets=$(cargo +nightly fuzz list --fuzz-dir fuzz)
nice -n 19 cargo +nightly fuzz build --fuzz-dir fuzz
mkdir -p "$work"
run_one() {
  local t=$1
  mkdir -p "$work/corpus/$t"
  # -rss_limit_mb: a parser that sizes an allocation from a length field shows up as an
  # out-of-memory crash well below the machine's memory (the default is 2048).
  nice -n 19 cargo +nightly fuzz run --fuzz-dir fuzz "$t" "$work/corpus/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 \
    >"$work/$t.log" 2>&1
}
export -f run_one
export work seconds
status=0
echo "$targets" | xargs -P "$jobs" -I{} bash -c 'run_one {}' || status=$?
for t in $targets; do
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$' || echo '?')
  secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$work/$t.log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' || echo '?')
  crash=$(grep -c 'SUMMARY\|panicked' "$work/$t.log" || true)
  echo "$t: ${runs} executions in ${secs} s, ${crash} failure line(s); log $work/$t.log"
done
exit "$status"
