#!/usr/bin/env bash
# Every GPU test and benchmark of kvlayout, in one go, on a GPU machine without network.
#
#   tools/gpu_check.sh [WHEELS_DIR ...]
#
# - installs this checkout into $KVL_TARGET (default /tmp/kvl; pip --no-deps --no-build-isolation --no-index
#   --target) and, from every WHEELS_DIR, its *.whl files (flashinfer, apache-tvm-ffi, nixl, transformers, ...)
#   and *.tar.xz archives of unzipped wheels into /tmp/site;
# - runs `pytest -m gpu`, then `kvlayout bench` (every tools/bench_*.py with a run(quick) entry point,
#   writing bench.json / bench.md / bench.png), then every other tools/bench_*.py directly, then
#   `kvlayout demo --device cuda` (two engines, NIXL over VRAM);
# - writes one log per step under $OUT (or ./gpu-out) and prints a short table last.
#
# Knobs: GPU_CHECK_STEPS (default "tests bench tools demo"; a device call is capped at 10 minutes, so run
# the steps in separate calls there, e.g. GPU_CHECK_STEPS=tests), GPU_CHECK_TIMEOUT (seconds per step and
# per tool, default 540), GPU_CHECK_QUICK=1 (bench tools in quick mode), PYTEST_ARGS (extra pytest args),
# GPU_CHECK_TOOLS (names of the tools/bench_*.py the tools step runs, e.g. "bench_transfer bench_pool";
# default all), BENCH_ARGS (extra arguments for each of them, e.g. "--quick").
# Exit status: 0 when no step failed or timed out.
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOGS="${OUT:-$REPO/gpu-out}"
WHEEL_DIRS=("$@")
STEPS="${GPU_CHECK_STEPS:-tests bench tools demo}"
STEP_TIMEOUT="${GPU_CHECK_TIMEOUT:-540}"
PY="${PYTHON:-python3}"
TARGET="${KVL_TARGET:-/tmp/kvl}"
mkdir -p "$LOGS"
RESULTS="$LOGS/summary.tsv"
: > "$RESULTS"

export FLASHINFER_WORKSPACE_BASE="${FLASHINFER_WORKSPACE_BASE:-/tmp/fiws}"
export FLASHINFER_CUDA_ARCH_LIST="${FLASHINFER_CUDA_ARCH_LIST:-9.0a}"
export UCX_NET_DEVICES="${UCX_NET_DEVICES:-lo}"
# NVLink multicast stays off (NCCL, PyTorch, NVSHMEM): on a shared host it can take the GPUs down
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"
export PYTHONDONTWRITEBYTECODE=1

record() {  # step status seconds note
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$RESULTS"
}

run_step() {  # name log command...: run with a timeout from a scratch folder, record status and time
    local name="$1" log="$2"
    shift 2
    local t0=$SECONDS rc
    (cd "$SCRATCH" && timeout "$STEP_TIMEOUT" "$@") > "$log" 2>&1
    rc=$?
    local secs=$((SECONDS - t0)) status=ok
    if [ $rc -eq 124 ]; then status="timeout"; elif [ $rc -ne 0 ]; then status="fail($rc)"; fi
    echo "$status $secs"
}

# ---- install --------------------------------------------------------------------------------------
t0=$SECONDS
{
    rm -rf "$TARGET" && "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target "$TARGET" "$REPO"
} > "$LOGS/install.log" 2>&1
rc=$?
export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
note="kvlayout -> $TARGET"
if [ ${#WHEEL_DIRS[@]} -gt 0 ]; then
    mkdir -p /tmp/site
    n=0
    for WHEELS in "${WHEEL_DIRS[@]}"; do
    if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-deps --no-index --target /tmp/site "$WHEELS"/*.whl >> "$LOGS/install.log" 2>&1 || rc=$?
        n=$((n + $(ls "$WHEELS"/*.whl | wc -l)))
    fi
    for t in "$WHEELS"/*.tar.xz; do                  # unzipped wheels packed small (see NOTES: FlashInfer in 20 MB)
        [ -e "$t" ] || continue
        tar -xJf "$t" -C /tmp/site >> "$LOGS/install.log" 2>&1 || rc=$?
        n=$((n + 1))
    done
    done
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
    note="$note; $n wheel sets from ${WHEEL_DIRS[*]} -> /tmp/site"
fi
record install "$([ $rc -eq 0 ] && echo ok || echo "fail($rc)")" $((SECONDS - t0)) "$note"
# Run everything from a scratch folder so `import kvlayout` finds the installed package, not ./kvlayout.
SCRATCH="$(mktemp -d)"
"$PY" - > "$LOGS/versions.log" 2>&1 <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")
for m in ("triton", "kvlayout", "flashinfer", "nixl", "transformers", "pytest", "matplotlib"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as e:
        print(m, "MISSING", type(e).__name__, e)
EOF

for step in $STEPS; do
    case "$step" in
    tests)
        read -r status secs < <(run_step tests "$LOGS/pytest-gpu.log" "$PY" -m pytest "$REPO/tests" -m gpu -q -rs \
            -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO" ${PYTEST_ARGS:-})
        record "pytest -m gpu" "$status" "$secs" "$(grep -E '(passed|failed|error|skipped)' "$LOGS/pytest-gpu.log" | tail -1)"
        ;;
    bench)
        read -r status secs < <(run_step bench "$LOGS/kvlayout-bench.log" "$PY" -m kvlayout bench \
            --tools "$REPO/tools" --out "$LOGS/bench" ${GPU_CHECK_QUICK:+--quick} \
            --timeout "$STEP_TIMEOUT")
        note=$("$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(', '.join(f'{n}: {t[\"status\"]}' for n, t in r['tools'].items()), '|', len(r['rows']), 'rows')" "$LOGS/bench/bench.json" 2>/dev/null || echo "no bench.json")
        record "kvlayout bench" "$status" "$secs" "$note"
        ;;
    tools)
        for f in "$REPO"/tools/bench_*.py; do
            [ -e "$f" ] || continue
            name=$(basename "$f" .py)
            if [ -n "${GPU_CHECK_TOOLS:-}" ]; then
                [[ " $GPU_CHECK_TOOLS " == *" $name "* ]] || continue
            else
                grep -q '^def run(' "$f" && continue      # kvlayout bench ran it
            fi
            read -r status secs < <(run_step "$name" "$LOGS/$name.log" "$PY" "$f" ${BENCH_ARGS:-})
            record "$name" "$status" "$secs" "$(grep -v '^\s*$' "$LOGS/$name.log" | tail -1 | cut -c1-100)"
        done
        ;;
    demo)
        read -r status secs < <(run_step demo "$LOGS/demo-cuda.log" "$PY" -m kvlayout demo --device cuda \
            --no-progress --summary-json "$LOGS/demo-cuda.json")
        record "kvlayout demo --device cuda" "$status" "$secs" "$(grep -E 'tokens match|DIFFER|error|NIXL is not' "$LOGS/demo-cuda.log" | tail -1 | cut -c1-100)"
        ;;
    *)
        record "$step" "unknown" 0 "steps are: tests bench tools demo"
        ;;
    esac
done
rm -rf "$SCRATCH"

echo
echo "logs: $LOGS"
printf '%-30s %-10s %6s  %s\n' step status secs note
awk -F'\t' '{ printf "%-30s %-10s %6s  %s\n", $1, $2, $3, $4 }' "$RESULTS"
! grep -qP '\t(fail|timeout)' "$RESULTS"
