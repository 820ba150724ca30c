#!/usr/bin/env bash
# Run every benchmark once and keep the output: bash scripts/bench_all.sh [RESULTS_DIR] [WORK_DIR]
# Needs the project installed (pip install -e .), fio for the loader comparison and ggml-python for the kernel one.
# Not a test: the numbers go into the README with the machine they came from.
set -u
results=${1:-bench-results}
work=${2:-/tmp/mertools-bench}
mkdir -p "$results"
export PYTHONUNBUFFERED=1
here=$(dirname "$0")
{ date -u; uname -a; nproc; lscpu | grep -E "Model name|L3"; free -g | head -2; } > "$results/machine.txt" 2>&1
python3 "$here/bench_extract.py" --dir "$work" --keep 2>&1 | grep -v INFO | tee "$results/extract.txt"
python3 "$here/bench_loader.py" --dir "$work" 2>&1 | tee "$results/loader.txt"
python3 "$here/bench_kernels.py" --sweep-prefetch 2>&1 | tee "$results/kernels.txt"
python3 "$here/bench_smoke.py" --dir "$work" --tokens 100 --workload markov --slots 16 --json "$results/smoke16.json" 2>&1 | grep -v INFO | tee "$results/smoke16.txt"
python3 "$here/bench_smoke.py" --dir "$work" --tokens 100 --workload zipf --slots 33 --json "$results/smoke33.json" 2>&1 | grep -v INFO | tee "$results/smoke33.txt"
python3 "$here/bench_deep.py" --dir "$work/deep" --repeat 5 2>&1 | grep -v INFO | tee "$results/deep.txt"
python3 "$here/bench_startup.py" --folder "$work/deep/out" --src "$work/deep/model.gguf" 2>&1 | tee "$results/startup.txt"
