#!/usr/bin/env bash
# Instructions per operation of keyholed, counted by valgrind's callgrind:
# repeatable whatever else the machine is doing (unlike seconds), so a
# regression shows up as a number.
#
#   .ci/callgrind.sh [KEYHOLED KEYHOLE]      # default: target/release/{keyholed,keyhole}
#   CALLGRIND_SHAPES="ping connect" .ci/callgrind.sh
#   CALLGRIND_BASELINE=.ci/callgrind-baseline.txt .ci/callgrind.sh   # compare
#
# For each shape, the daemon runs under callgrind twice: once driven with
# N1 operations, once with N2; (Ir(N2) - Ir(N1)) / (N2 - N1) is the cost of
# one operation without start-up and shutdown. Prints one line per shape:
# `SHAPE INSTRUCTIONS_PER_OP`, and with a baseline file the ratio to it.
set -euo pipefail
cd "$(dirname "$0")/.."
keyholed="${1:-target/release/keyholed}"
keyhole="${2:-target/release/keyhole}"
shapes="${CALLGRIND_SHAPES:-ping ping64 publish fanout connect connect1rt}"
n1="${CALLGRIND_N1:-2000}"
n2="${CALLGRIND_N2:-6000}"
command -v valgrind >/dev/null || { echo "callgrind: valgrind is not installed" >&2; exit 1; }

# `keyhole bench` arguments of each shape (the client is not measured).
args_of() {
    case "$1" in
        ping) echo "ping -c 1 -P 1" ;;
        ping64) echo "ping -c 1 -P 64 --burst" ;;
        publish) echo "publish -c 1 -P 16 --payload 64 --burst" ;;
        fanout) echo "fanout -S 16 -P 64 --payload 64" ;;
        connect) echo "connect" ;;
        # What the library client does: the ping in the handshake's write.
        connect1rt) echo "connect --pipelined" ;;
        *) echo "callgrind: unknown shape $1" >&2; exit 2 ;;
    esac
}

# The shape's count of operations per `-n` (fanout counts publishes; a
# publish is delivered to 16 subscribers).
measure() {
    local shape=$1 n=$2 dir out
    dir=$(mktemp -d)
    chmod 700 "$dir"
    out="$dir/callgrind.out"
    # glibc copies blocks above a few KiB with `rep movsb`, which callgrind
    # counts once per byte although the CPU moves 32 or more bytes a cycle:
    # a change that merely coalesces copies would read as a 5x regression.
    # A threshold nothing reaches keeps every copy on the vector loop, whose
    # count tracks its cost.
    GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=1073741824 \
        valgrind --tool=callgrind --callgrind-out-file="$out" --trace-children=no \
        "$keyholed" --dir "$dir/run" --threads 1 >"$dir/log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 600); do
        [ -S "$dir/run/keyhole.sock" ] && [ -s "$dir/run/session-token" ] && break
        sleep 0.05
    done
    # shellcheck disable=SC2046
    KEYHOLE_DIR="$dir/run" "$keyhole" --timeout 60 bench $(args_of "$shape") -n "$n" >/dev/null
    KEYHOLE_DIR="$dir/run" "$keyhole" stop
    wait "$pid" || true
    local ir
    ir=$(sed -n 's/^summary: \([0-9]*\).*/\1/p; s/^totals: \([0-9]*\).*/\1/p' "$out" | head -n 1)
    rm -rf "$dir"
    echo "$ir"
}

for shape in $shapes; do
    a=$(measure "$shape" "$n1")
    b=$(measure "$shape" "$n2")
    per=$(( (b - a) / (n2 - n1) ))
    line="$shape $per"
    if [ -n "${CALLGRIND_BASELINE:-}" ] && [ -f "$CALLGRIND_BASELINE" ]; then
        base=$(awk -v s="$shape" '$1 == s { print $2 }' "$CALLGRIND_BASELINE")
        if [ -n "$base" ] && [ "$base" -gt 0 ]; then
            line="$line baseline $base ratio $(awk -v a="$per" -v b="$base" 'BEGIN { printf "%.3f", a / b }')"
        fi
    fi
    echo "$line"
done
