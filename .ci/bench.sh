#!/usr/bin/env bash
# The benchmarks in quick mode: proves that they build and run and that every
# reply and event they send is verified. Never asserts speed (the CI machine
# is shared; see the README's "Performance" section for real figures).
#
#   .ci/bench.sh            # from anywhere in the repository
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

section() { printf '\n=== %s ===\n' "$*"; }

section "redis (comparison baseline)"
apt_updated=
apt_install() {
    # Missing: install it. If apt cannot, go on: compare skips the rows of
    # that server and says so.
    if [ -z "$apt_updated" ]; then
        apt-get update -qq >>/tmp/keyhole-apt.log 2>&1 || true
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>/tmp/keyhole-apt.log 2>&1
}
if command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null; then
    redis-server --version
elif command -v apt-get >/dev/null; then
    if apt_install redis-server redis-tools; then
        redis-server --version
    else
        echo "apt-get could not install redis-server/redis-tools (log: /tmp/keyhole-apt.log);"
        echo "continuing: the compare bench skips the Redis rows."
    fi
else
    echo "no redis-server and no apt-get: the compare bench skips the Redis rows."
fi

section "nats-server (comparison baseline)"
# Debian's package puts it in /usr/sbin, often not on PATH; compare looks
# there too (or at NATS_SERVER_BIN).
nats_server() {
    if [ -n "${NATS_SERVER_BIN:-}" ]; then
        echo "$NATS_SERVER_BIN"
    elif command -v nats-server >/dev/null; then
        command -v nats-server
    elif [ -x /usr/sbin/nats-server ]; then
        echo /usr/sbin/nats-server
    else
        return 1
    fi
}
if nats=$(nats_server); then
    "$nats" --version
elif command -v apt-get >/dev/null; then
    if apt_install nats-server && nats=$(nats_server); then
        "$nats" --version
    else
        echo "apt-get could not install nats-server (log: /tmp/keyhole-apt.log);"
        echo "continuing: the compare bench skips the NATS rows."
    fi
else
    echo "no nats-server and no apt-get: the compare bench skips the NATS rows."
fi

section "build (release)"
cargo build --release --bins

section "keyhole bench --quick against a fresh daemon"
dir=$(mktemp -d)
chmod 700 "$dir"
target/release/keyholed --dir "$dir/run" 2>"$dir/keyholed.log" &
daemon=$!
cleanup() {
    kill "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 1 200); do
    [ -S "$dir/run/keyhole.sock" ] && [ -s "$dir/run/session-token" ] && break
    sleep 0.05
done
# Every workload, briefly; a lost or corrupted reply exits non-zero.
KEYHOLE_DIR="$dir/run" timeout 120 target/release/keyhole bench --quick --duration 0.5 -c 8 -P 4
KEYHOLE_DIR="$dir/run" timeout 60 target/release/keyhole bench ping publish --quick -n 2000 -c 2 -P 16
KEYHOLE_DIR="$dir/run" target/release/keyhole stop
wait "$daemon"

section "compare --quick (keyholed vs raw echo vs redis vs nats)"
timeout 600 cargo bench --bench compare -- --quick

section "churn --quick (subscription churn vs a pinger; keyholed vs redis)"
timeout 300 cargo bench --bench churn -- --quick

section "patterns --quick (fan-out with 10 vs 10,000 patterns subscribed)"
timeout 300 cargo bench --bench patterns -- --quick

section "memfd --quick (publish by sealed memfd vs inline, 64 KiB to 64 MiB)"
timeout 300 cargo bench --bench memfd -- --quick

section "micro (criterion, quick)"
timeout 600 cargo bench --bench micro -- --quick --warm-up-time 0.2 --measurement-time 0.5

section "callgrind: instructions per operation against .ci/callgrind-baseline.txt"
# Counts, not seconds: they do not drift with the machine's load, so a
# ratio above 1 is a real regression (or a different CPU or glibc: the
# baseline was recorded on x86_64 with glibc 2.36). Reported, not enforced.
if ! command -v valgrind >/dev/null && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; } \
        >/tmp/keyhole-apt-valgrind.log 2>&1 || true
fi
if command -v valgrind >/dev/null; then
    CALLGRIND_BASELINE=.ci/callgrind-baseline.txt timeout 900 .ci/callgrind.sh |
        awk '{ print } $6 + 0 > 1.05 { worse = worse " " $1 } END { if (worse) print "callgrind: more than 5% above the baseline:" worse; else print "callgrind: every shape within 5% of the baseline or below" }' ||
        echo "callgrind: the measurement itself failed (see above)"
else
    echo "valgrind is not installed and could not be: no instruction counts."
fi

# Reached only if every stage above passed (set -e): keyhole bench, compare,
# churn, patterns, memfd and micro each verified every reply they got.
echo "benchmarks: 6 passed, 0 failed"
