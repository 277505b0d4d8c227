#!/bin/bash
# 48B slice, int4, ours only: the bf16 MLA cache (HEAD) against the float32 one (d49a894), alternating.
cd /work/main
for round in 1 2; do
  for side in head base; do
    if [ $side = base ]; then pp=/tmp/base-shim; else pp=; fi
    echo "round $round $side load $(cut -d' ' -f1-3 /proc/loadavg)"
    KIMI_DESK_THREADS=2 PYTHONPATH=$pp .venv/bin/python packaging/bench/cpu/slice_48b.py .bench/r48-4 --ours-only \
      --depths 0,8192,32768,131072 --gen 8 2>/dev/null | tail -1
  done
done
