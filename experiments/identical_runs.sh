#!/usr/bin/env bash
# The runs behind experiments/RESULTS.md's "Same numbers" section, made with
# the code in CODE_DIR into OUT_DIR (emptied first):
#   tiny_fresh  configs/tiny.py, 60 steps
#   tiny_kill   the same, kill -9 once step 40 is logged, then restarted
#   d20_fresh   configs/d20.py:cpu, SIGTERM once step 100 is logged
#   d20_kill    d20:cpu with checkpoints every 50 steps, kill -9 after step
#               75, restarted, SIGTERM after step 100
# Compare two trees' runs with experiments/compare_metrics.py (--max_step=100
# for the d20 runs).
# usage: PYTHON=.venv/bin/python experiments/identical_runs.sh CODE_DIR OUT_DIR
set -u
code=$(cd "$1" && pwd); mkdir -p "$2"; out=$(cd "$2" && pwd)
py=${PYTHON:-python3}
cd "$code"; export PYTHONPATH=$code
wait_step() {  # FILE STEP: until FILE has a record of STEP
  until [ -f "$1" ] && grep -q "\"step\": $2[,}]" "$1"; do sleep 0.05; done
}
run() { exec "$py" -m bitnet_jax.main "$@"; }  # exec: `$!` is python's pid
rm -rf "${out:?}"/*
(run --config=configs/tiny.py --workdir="$out/tiny_fresh") \
    > "$out/tiny_fresh.log" 2>&1
run --config=configs/tiny.py --workdir="$out/tiny_kill" \
    > "$out/tiny_kill.log" 2>&1 &
pid=$!; wait_step "$out/tiny_kill/metrics.jsonl" 40; kill -9 $pid
wait $pid 2>/dev/null
(run --config=configs/tiny.py --workdir="$out/tiny_kill") \
    >> "$out/tiny_kill.log" 2>&1
run --config=configs/d20.py:cpu --workdir="$out/d20_fresh" \
    > "$out/d20_fresh.log" 2>&1 &
pid=$!; wait_step "$out/d20_fresh/metrics.jsonl" 100; kill -TERM $pid
wait $pid
d20_kill=(--config=configs/d20.py:cpu --workdir="$out/d20_kill"
          --config.train.checkpoint_every=50)
run "${d20_kill[@]}" > "$out/d20_kill.log" 2>&1 &
pid=$!; wait_step "$out/d20_kill/metrics.jsonl" 75; kill -9 $pid
wait $pid 2>/dev/null
run "${d20_kill[@]}" >> "$out/d20_kill.log" 2>&1 &
pid=$!; wait_step "$out/d20_kill/metrics.jsonl" 100; kill -TERM $pid
wait $pid
grep -h -o "resuming at step [0-9]*" "$out"/*_kill.log
