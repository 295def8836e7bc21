#!/usr/bin/env bash
# Continuous fuzzing of keyhole: builds every cargo-fuzz target and runs each
# one in TARGETS for FUZZ_SECONDS over a scratch copy of its committed corpus
# (fuzz/corpus/<target>/ is never written to), with fuzz/keyhole.dict.
#
#   TARGETS="preauth frame session subjects"   targets to run (space separated)
#   FUZZ_SECONDS=60           seconds per target
#   FUZZ_SCRATCH=fuzz/target/ci-corpus   where the scratch corpora and logs go
#
# Exits non-zero if any target crashes (panic, broken invariant, leak, OOM,
# timeout), after printing the artifact and the command that reproduces it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO_FUZZ_VERSION=0.13.2
TARGETS="${TARGETS:-preauth frame session subjects}"
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
FUZZ_SCRATCH="${FUZZ_SCRATCH:-fuzz/target/ci-corpus}"

if ! cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

# libFuzzer's instrumentation needs nightly flags: the nightly toolchain if
# there is one, else stable told to accept them.
if cargo +nightly --version >/dev/null 2>&1; then
    fuzz=(cargo +nightly fuzz)
    repro="cargo +nightly fuzz"
    rustc_version="$(rustc +nightly --version)"
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
    repro="RUSTC_BOOTSTRAP=1 cargo fuzz"
    rustc_version="$(rustc --version) with RUSTC_BOOTSTRAP=1"
fi
echo "fuzz: $("${fuzz[@]}" --version), $rustc_version"

echo "fuzz: building all targets"
"${fuzz[@]}" build

failed=()
for target in $TARGETS; do
    corpus="$FUZZ_SCRATCH/$target"
    log="$FUZZ_SCRATCH/$target.log"
    rm -rf "$corpus"
    mkdir -p "$corpus" fuzz/artifacts/"$target"
    if [ -d "fuzz/corpus/$target" ]; then
        cp -R "fuzz/corpus/$target/." "$corpus/"
    fi
    echo "fuzz: $target for ${FUZZ_SECONDS}s over $(find "$corpus" -type f | wc -l) seeds (log: $log)"
    status=0
    "${fuzz[@]}" run "$target" "$corpus" -- \
        -dict=fuzz/keyhole.dict \
        -max_total_time="$FUZZ_SECONDS" \
        -timeout=20 \
        -print_final_stats=1 \
        >"$log" 2>&1 || status=$?

    # The closing coverage line and the final stats, for the CI log.
    grep -E '^#[0-9]+[[:space:]]+(DONE|INITED)' "$log" | tail -n 2 | sed "s/^/fuzz: $target: /" || true
    grep -E '^stat::' "$log" | sed "s/^/fuzz: $target: /" || true

    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        echo "fuzz: $target FAILED (exit $status); end of its log:"
        tail -n 60 "$log"
        artifact="$(sed -n 's/.*Test unit written to \([^[:space:]]*\).*/\1/p' "$log" | tail -n 1)"
        if [ -n "$artifact" ]; then
            echo "fuzz: $target: crash input: $artifact"
            echo "fuzz: $target: reproduce with: $repro run $target $artifact"
            echo "fuzz: $target: minimize with:  $repro tmin $target $artifact"
            echo "fuzz: $target: then copy it to fuzz/regressions/$target/ and run: cargo test --test fuzz_corpus"
        else
            echo "fuzz: $target: no artifact was written (build or setup failure?)"
        fi
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz: crashed: ${failed[*]}"
    exit 1
fi
echo "fuzz: all targets passed: $TARGETS"
