#!/usr/bin/env bash
# Side by side on the GPU machine: older code in .bench-old (git-ignored; e.g.
#   rm -rf .bench-old && mkdir .bench-old && git archive <commit> | tar -x -C .bench-old
# then carry .kit and .bench-old) and this tree, in turn, on the same rendered scenes.
# SCENES (default 64) and RUNS (default "new old new old") choose the size and the order.
# Each build's results go to $OUT/<n>-<old|new>.json/.md, its log beside them.
set -u
source .kit/use-kit.sh; KITPP=$PYTHONPATH
ROOT=$PWD
ARGS="${EXTRA:-} --work $ROOT/.bench-work --parts scene --scenes ${SCENES:-64} --unique 6 --min-frames 150 --max-frames 200 --inflight 16"
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpu.txt
nproc >> $OUT/gpu.txt
for run in ${RUNS:-new old new old}; do
  n=$((${n:-0}+1))
  if [ $run = old ]; then cd $ROOT/.bench-old; export PYTHONPATH=$ROOT/.bench-old:${KITPP:-}; else cd $ROOT; export PYTHONPATH=$ROOT:${KITPP:-}; fi
  t0=$(date +%s)
  python bench/bench_scene_passes.py --out $ROOT/.bench-res/$n-$run $ARGS > $OUT/$n-$run.log 2>&1
  echo "$n $run rc=$? $(( $(date +%s) - t0 )) s" >> $OUT/runs.txt
  cp $ROOT/.bench-res/$n-$run/bench_scene_passes.json $OUT/$n-$run.json 2>/dev/null
  cp $ROOT/.bench-res/$n-$run/bench_scene_passes.md $OUT/$n-$run.md 2>/dev/null
done
cd $ROOT && tar czf $OUT/traces.tgz .bench-res/*/scene-trace 2>/dev/null
