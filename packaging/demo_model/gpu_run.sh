#!/bin/bash
# The demo model's training and evaluation on a lent GPU machine, where one command may run at most
# 10 minutes: `start` launches train.py then evaluate.py in a new process session (so they outlive the
# command), `wait SECONDS` follows the log until the pipeline ends or SECONDS pass, then copies what
# exists to $OUT (the model's shards, its config and tokenizer, a tarball of the logs and tables).
# Run from the repository root, after `source packaging/source_shim.sh`.
set -u
build=build/demo_model
run=$build/run

case "${1:-}" in
start)
    rm -f $build/pipeline.done
    # The corpus as text (14 MB of xz, where its token cache is 40 MB): train.py tokenizes it here.
    [ -f $build/corpus_text.tar.xz ] && [ ! -f $build/corpus/manifest.json ] && tar -xJf $build/corpus_text.tar.xz -C $build
    # Kernels compiled on an earlier machine: 7 of the first run's 17 minutes went to compiling them.
    [ -f $build/triton_cache.tar.gz ] && mkdir -p ~/.triton && tar -xzf $build/triton_cache.tar.gz -C ~/.triton
    setsid nohup bash -c "
        python3 packaging/demo_model/train.py --device cuda --time-budget-minutes ${BUDGET_MINUTES:-17} \
            --max-shard-mb 15 --out $run ${TRAIN_ARGS:-}; echo \"train.py exit \$?\"
        python3 packaging/demo_model/evaluate.py --model $run/model --device cuda --trials ${TRIALS:-10}
        echo \"evaluate.py exit \$?\"; touch $build/pipeline.done" > $build/pipeline.out 2>&1 < /dev/null &
    echo "started: $build/pipeline.out"
    ;;
wait)
    deadline=$((SECONDS + ${2:-540}))
    while [ ! -e $build/pipeline.done ] && [ $SECONDS -lt $deadline ]; do sleep 5; done
    tail -n 25 $build/pipeline.out
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
    if [ -n "${OUT:-}" ]; then
        [ -d $run/model ] && cp $run/model/* "$OUT"/
        tar -czf "$OUT/run_logs.tar.gz" --ignore-failed-read $build/pipeline.out \
            $(cd . && ls -d $run/log.jsonl $run/loss_curve.csv $run/summary.json $run/eval 2>/dev/null)
    fi
    if [ -e $build/pipeline.done ] && [ -n "${OUT:-}" ] && [ -d ~/.triton/cache ]; then
        # For the next machine (carry it as build/demo_model/triton_cache.tar.gz), when it fits a file back.
        tar -czf /tmp/triton_cache.tar.gz -C ~/.triton cache
        [ "$(stat -c %s /tmp/triton_cache.tar.gz)" -lt 16000000 ] && cp /tmp/triton_cache.tar.gz "$OUT"/ ||
            echo "Triton cache $(du -h /tmp/triton_cache.tar.gz | cut -f1): too large to bring back"
    fi
    [ -e $build/pipeline.done ] && echo "pipeline done" || echo "pipeline still running"
    ;;
*)
    echo "usage: $0 start | wait SECONDS" >&2; exit 2 ;;
esac
