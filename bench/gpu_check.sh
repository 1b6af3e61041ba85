#!/usr/bin/env bash
# The GPU check of issue 16: everything that needs a CUDA device, in one script, under 8 minutes on
# one H100 or H200, every figure appended to ONE results file.
#
#   1. tests: every `-m gpu` test of tests/kernels at full size (TRITON_INTERPRET unset);
#   2. attention: bench_attention.py (block-sparse kernel vs SDPA and FlexAttention, with the
#      block-level ceilings) and bench_attention_kernels.py (per-kernel times, default settings);
#   3. powersgd: bench_powersgd.py (the Triton kernels vs their torch references, our DDP hook vs
#      torch's powerSGD_hook);
#   4. mfu: bench_transformer_gpu.py at about 1B parameters (d_model 2048, 20 layers, 16 heads,
#      256 text + 32x32 image tokens), bf16 (DALL-E layouts and dense), then fp16 with per-resblock
#      scales, each against the 40% MFU target;
#   5. fp16-200: 200 fp16 updates with per-resblock scales (d_model 512, 8 layers), loss, min/max
#      scale and skipped updates every 50 steps, PASS/FAIL on: loss finite and fell, < 10% skipped.
#
# Each command runs under `timeout` and the script goes on after a failure, recording it; the
# exit status is non-zero when any step failed (a missed MFU target is recorded as FAIL but does
# not fail its step). Without a CUDA device it refuses to start (exit 2) unless --dry-run.
#
#   bash bench/gpu_check.sh              # on the GPU machine
#   bash bench/gpu_check.sh --dry-run    # anywhere: print the commands and their timeouts, check
#                                        # that each script exists and that its --help exits 0
#   bash bench/gpu_check.sh --out FILE   # results file (default $OUT/gpu_check.txt if $OUT is set,
#                                        # else bench/results/gpu_check.txt)
#
# The package need not be installed: a sitecustomize.py written to a temporary folder (put first on
# PYTHONPATH) maps `tessera`, `tessera.trainer`, `tessera.kernels`, `tessera.dataprep` and
# `tessera.cluster` to this checkout's folders, for this process and every Python it starts (the
# bench scripts put the repository root first on sys.path, where the bare tessera/ folder would
# otherwise hide the four others). Wheels in .whl/ (carried by the session, never downloaded) are
# installed with pip --no-index into a temporary --target folder that also goes on PYTHONPATH.
# $PYTHON picks the interpreter (default python3).

set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
DRY=0
RESULTS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) shift; RESULTS="${1:-}" ;;
        --out=*) RESULTS="${1#--out=}" ;;
        -h|--help) sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (expected --dry-run, --out FILE)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$RESULTS" ]; then
    if [ -n "${OUT:-}" ]; then RESULTS="$OUT/gpu_check.txt"; else RESULTS="$REPO/bench/results/gpu_check.txt"; fi
fi

# -- making tessera importable without installing it ------------------------------------------------

WORK="$(mktemp -d "${TMPDIR:-/tmp}/tessera_gpu_check.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/boot"
cat > "$WORK/boot/sitecustomize.py" <<'PYEOF'
"""Written by bench/gpu_check.sh: import tessera and its four folders from TESSERA_REPO, uninstalled."""

import importlib.abc
import importlib.util
import os
import sys

_REPO = os.environ.get("TESSERA_REPO", "")
_FOLDERS = {"tessera": "tessera", "tessera.trainer": "trainer", "tessera.kernels": "kernels", "tessera.dataprep": "dataprep", "tessera.cluster": "cluster"}


class _TesseraFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        folder = _FOLDERS.get(name)
        if folder is None or not _REPO:
            return None
        d = os.path.join(_REPO, folder)
        init = os.path.join(d, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[d])


sys.meta_path.insert(0, _TesseraFinder())

# then the interpreter's own sitecustomize, if it has one
_here = os.path.dirname(os.path.abspath(__file__))
_saved, _me = list(sys.path), sys.modules.pop("sitecustomize", None)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
try:
    import sitecustomize  # noqa: F401
except ImportError:
    if _me is not None:
        sys.modules["sitecustomize"] = _me
finally:
    sys.path[:] = _saved
PYEOF
export TESSERA_REPO="$REPO"
export TESSERA_PROGRESS=0
PYPATH="$WORK/boot"
shopt -s nullglob
WHEELS=("$REPO"/.whl/*.whl)
shopt -u nullglob
if [ ${#WHEELS[@]} -gt 0 ]; then
    if [ "$DRY" = 1 ]; then
        echo "wheels: would install ${#WHEELS[@]} from .whl/ with pip --no-index --no-deps into a --target folder"
    else
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "${WHEELS[@]}" \
            || echo "gpu_check.sh: installing the wheels of .whl/ failed; going on without them" >&2
        PYPATH="$PYPATH:$WORK/site"
    fi
fi
export PYTHONPATH="$PYPATH${PYTHONPATH:+:$PYTHONPATH}"

# -- the steps --------------------------------------------------------------------------------------
# step name | timeout (s) | command (run from the repository root)

BIG="--d-model 2048 --layers 20 --heads 16 --batch 16 --steps 13 --warmup 3 --target-mfu 40"
STEPS=(
    "tests|140|env -u TRITON_INTERPRET $PY -m pytest -q -p no:cacheprovider -m gpu tests/kernels"
    "attention|55|$PY bench/bench_attention.py --batch 4 --heads 16 --block 64 --dtype fp16"
    "attention|30|$PY bench/bench_attention_kernels.py --batch 4 --heads 16 --dtype fp16"
    "powersgd|55|$PY bench/bench_powersgd.py --n 8 --m 4096 --cols 4096 --rank 4"
    "mfu|80|$PY bench/bench_transformer_gpu.py $BIG --attention dalle dense --precision bf16"
    "mfu|55|$PY bench/bench_transformer_gpu.py $BIG --attention dalle --precision fp16 --per-resblock"
    "fp16-200|55|$PY bench/bench_transformer_gpu.py --d-model 512 --layers 8 --heads 8 --batch 8 --attention dalle --precision fp16 --per-resblock --steps 200 --warmup 10 --lr 3e-4 --data-batches 4 --log-every 50 --check-training"
)
# the timeouts add up to 470 s: under 8 minutes with the header, even if every command ran out of time

# the script a command runs (its first *.py argument), for the dry run
script_of() {
    local w
    for w in $1; do
        case "$w" in *.py) echo "$w"; return ;; esac
    done
    echo ""
}

FAILED=0
SUMMARY=()

IMPORTS=$(cat <<'PYEOF'
import os

import tessera
import tessera.cluster.powersgd
import tessera.kernels.block_sparse_attention
import tessera.kernels.layouts
import tessera.trainer.grad_scale
import tessera.trainer.transformer

repo = os.path.realpath(os.environ["TESSERA_REPO"])
mods = [tessera, tessera.cluster.powersgd, tessera.kernels.block_sparse_attention, tessera.trainer.grad_scale, tessera.trainer.transformer]
outside = [m.__name__ for m in mods if not os.path.realpath(m.__file__).startswith(repo + os.sep)]
assert not outside, f"imported from outside {repo}: {outside}"
print(f"ok: tessera, tessera.trainer, tessera.kernels and tessera.cluster import from {repo}")
PYEOF
)

if [ "$DRY" = 1 ]; then
    echo "gpu_check.sh --dry-run: results would go to $RESULTS"
    # the checks (each script's --help, the test collection, the imports) start together in the background, each
    # writing its output and exit status under $WORK, and are reported below in order: one Python start-up each
    # (torch's import: ~3.5 s on a slow CPU) runs beside the others instead of after them
    check() {  # check NAME TIMEOUT COMMAND...: run COMMAND under timeout, output to $WORK/NAME.txt, status to $WORK/NAME.rc
        local name="$1" t="$2"; shift 2
        ( timeout -k 5 "$t" "$@" > "$WORK/$name.txt" 2>&1; echo $? > "$WORK/$name.rc" ) &
    }
    n=0
    for entry in "${STEPS[@]}"; do
        rest="${entry#*|}"; cmd="${rest#*|}"; script="$(script_of "$cmd")"
        if [ -n "$script" ] && [ -f "$script" ] && [ ! -e "$WORK/help_${script//\//_}.rc" ]; then
            : > "$WORK/help_${script//\//_}.rc"
            check "help_${script//\//_}" 90 "$PY" "$script" --help
        elif [ -z "$script" ] && [ -d tests/kernels ] && [ ! -e "$WORK/collect.rc" ]; then
            : > "$WORK/collect.rc"
            check collect 120 "$PY" -m pytest -q -p no:cacheprovider --collect-only -m gpu tests/kernels
        fi
    done
    check imports 90 "$PY" -c "$IMPORTS"
    wait
    CHECKED=""
    i=0
    for entry in "${STEPS[@]}"; do
        i=$((i + 1))
        name="${entry%%|*}"; rest="${entry#*|}"; t="${rest%%|*}"; cmd="${rest#*|}"
        echo "[$i] step $name, timeout ${t}s: $cmd"
        script="$(script_of "$cmd")"
        if [ -n "$script" ]; then
            if [ ! -f "$script" ]; then
                echo "    MISSING: $script"; FAILED=1; continue
            fi
            case " $CHECKED " in *" $script "*) echo "    ok: $script (checked above)"; continue ;; esac
            CHECKED="$CHECKED $script"
            if [ "$(cat "$WORK/help_${script//\//_}.rc")" = 0 ]; then
                echo "    ok: $script exists, --help exits 0"
            else
                echo "    FAILED: $script --help exits non-zero:"; tail -5 "$WORK/help_${script//\//_}.txt" | sed 's/^/      /'; FAILED=1
            fi
        else
            # the tests: the folder exists and the gpu marker selects tests there
            if [ ! -d tests/kernels ]; then
                echo "    MISSING: tests/kernels"; FAILED=1; continue
            fi
            if [ "$(cat "$WORK/collect.rc")" = 0 ]; then
                echo "    ok: $(grep -E '[0-9]+(/[0-9]+)? tests? (collected|selected)' "$WORK/collect.txt" | tail -1)"
            else
                echo "    FAILED: pytest --collect-only -m gpu tests/kernels:"; tail -5 "$WORK/collect.txt" | sed 's/^/      /'; FAILED=1
            fi
        fi
    done
    # the package, uninstalled: every module the steps import comes from this checkout
    if [ "$(cat "$WORK/imports.rc")" = 0 ]; then
        echo "[imports] $(cat "$WORK/imports.txt")"
    else
        echo "[imports] FAILED:"; tail -5 "$WORK/imports.txt" | sed 's/^/      /'; FAILED=1
    fi
    if [ "$FAILED" = 0 ]; then echo "dry run: all ${#STEPS[@]} commands ready"; else echo "dry run: something is missing (above)"; fi
    exit "$FAILED"
fi

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device for $PY (torch.cuda.is_available() is False, or torch is missing); on CPU use --dry-run" >&2
    exit 2
fi
gpu_name() {
    if command -v nvidia-smi > /dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1
    else
        echo "nvidia-smi not found"
    fi
}
mkdir -p "$(dirname "$RESULTS")" || exit 2
{
    echo "=== gpu_check.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "gpu: $(gpu_name)"
    "$PY" - <<'PYEOF' 2>&1
import torch
try:
    import triton
    tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"not importable ({type(e).__name__})"
cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"python {__import__('sys').version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, device {cuda}")
PYEOF
    echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo ' (working tree modified)')"
} | tee -a "$RESULTS"

START=$SECONDS
i=0
for entry in "${STEPS[@]}"; do
    i=$((i + 1))
    name="${entry%%|*}"; rest="${entry#*|}"; t="${rest%%|*}"; cmd="${rest#*|}"
    echo "--- [$i] step $name (timeout ${t}s): $cmd" | tee -a "$RESULTS"
    t0=$SECONDS
    # shellcheck disable=SC2086  # the command is split into words on purpose
    timeout -k 10 "$t" $cmd 2>&1 | tee -a "$RESULTS"
    rc=${PIPESTATUS[0]}
    dt=$((SECONDS - t0))
    if [ "$rc" = 0 ]; then
        status="ok"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status="TIMEOUT after ${t}s"; FAILED=1
    else
        status="FAILED rc=$rc"; FAILED=1
    fi
    line="[$i] $name: $status (${dt}s)"
    SUMMARY+=("$line")
    echo "--- $line" | tee -a "$RESULTS"
done
{
    echo "=== summary ($((SECONDS - START))s in all)"
    for line in "${SUMMARY[@]}"; do echo "$line"; done
    echo
} | tee -a "$RESULTS"
echo "results: $RESULTS"
exit "$FAILED"
