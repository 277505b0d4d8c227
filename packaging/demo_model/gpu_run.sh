#!/bin/bash
# The demo model's training and evaluation on a lent GPU machine, where one command may run at most
# 10 minutes: `start` launches train.py then evaluate.py in a new process session (so they outlive the
# command), `wait SECONDS` follows the log until the pipeline ends or SECONDS pass, then copies what
# exists to $OUT (the model's shards, its config and tokenizer, a tarball of the logs and tables).
# Run from the repository root, after `source packaging/source_shim.sh`.
#
# `all` is the one-call form (a single command of at most ~9 minutes, nothing left running after it):
# installs the carried wheels (.whl/: fla-core 0.6.0 and einops for the KDA backward pass, pypdf and
# platformdirs, which kimi_desk's ingest imports and the GPU image lacks), unpacks the corpus, trains
# from assets/model on the clock, copies the model to $OUT at once, evaluates on the GPU until the deadline, and leaves in $OUT (at most 8 files of under
# 16 MiB, one folder deep): model/ (3 safetensors shards of 15 MB, the index, config.json; the tokenizer is
# assets/model's), run_logs.tar.gz (pipeline output, log.jsonl, loss curve, summary, eval tables and every
# reply), triton_cache.tar.gz when it fits. Environment:
#   DEADLINE_SECONDS  the whole command's wall-clock budget, from its start (default 560)
#   EVAL_SECONDS      kept for the evaluation at the end (default 150)
#   TRAIN_MINUTES     minutes of steps after start-up (default: what the deadline leaves)
#   TRAIN_ARGS        more train.py options (they override the defaults below)
#   EVAL_ARGS         more evaluate.py options (e.g. --copy-code-spans: answers as the app gives them)
set -u
build=build/demo_model
run=$build/run

copy_logs() {
    [ -n "${OUT:-}" ] || return 0
    tar -czf "$OUT/run_logs.tar.gz" --ignore-failed-read $build/pipeline.out \
        $(ls -d $run/log.jsonl $run/loss_curve.csv $run/loss_curve.png $run/summary.json $run/eval 2>/dev/null)
}

case "${1:-}" in
all)
    began=$SECONDS
    deadline=${DEADLINE_SECONDS:-560}
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    [ -f $build/corpus_text.tar.xz ] && [ ! -f $build/corpus/manifest.json ] && tar -xJf $build/corpus_text.tar.xz -C $build
    [ -f $build/triton_cache.tar.gz ] && mkdir -p ~/.triton && tar -xzf $build/triton_cache.tar.gz -C ~/.triton
    if [ -n "${TRAIN_MINUTES:-}" ]; then
        clock="--train-minutes $TRAIN_MINUTES"
    else
        # train.py's budget counts its own start-up: it ends its steps EVAL_SECONDS before the deadline.
        clock="--time-budget-minutes $(python3 -c "print(max(1, $deadline - ${EVAL_SECONDS:-150} - ($SECONDS - $began)) / 60)")"
    fi
    python3 packaging/demo_model/train.py --device ${DEVICE:-cuda} --init-from assets/model $clock --max-shard-mb 15 \
        --out $run --retrieval-fraction 1 --lr 6e-4 --warmup-steps 20 --lm-mix 0.25 \
        --batch-tokens 131072 --micro-batch-tokens 65536 --lm-context 4096 \
        --retrieval-contexts 1024,2048,4096,1024,2048,8192,4096,16384 --eval-every 100 \
        ${TRAIN_ARGS:-} > $build/pipeline.out 2>&1
    echo "train.py exit $? after $((SECONDS - began)) s" | tee -a $build/pipeline.out
    if [ -n "${OUT:-}" ] && [ -d $run/model ]; then
        mkdir -p "$OUT/model" && cp $run/model/*.safetensors $run/model/*.json "$OUT/model/" && rm -f "$OUT/model/tokenizer.json"
    fi
    copy_logs
    left=$((deadline - (SECONDS - began) - 15))
    if [ $left -gt 30 ]; then
        timeout $left python3 packaging/demo_model/evaluate.py --model $run/model --device ${DEVICE:-cuda} --out $run/eval \
            ${EVAL_ARGS:-} >> $build/pipeline.out 2>&1
        echo "evaluate.py exit $? after $((SECONDS - began)) s" | tee -a $build/pipeline.out
    fi
    copy_logs
    if [ -n "${OUT:-}" ] && [ -d ~/.triton/cache ]; then
        tar -czf /tmp/triton_cache.tar.gz -C ~/.triton cache
        [ "$(stat -c %s /tmp/triton_cache.tar.gz)" -lt 16000000 ] && cp /tmp/triton_cache.tar.gz "$OUT"/
    fi
    tail -n 30 $build/pipeline.out
    ls -la "${OUT:-.}" "${OUT:-.}/model" 2>/dev/null
    ;;
start)
    rm -f $build/pipeline.done
    # The corpus as text (14 MB of xz, where its token cache is 40 MB): train.py tokenizes it here.
    [ -f $build/corpus_text.tar.xz ] && [ ! -f $build/corpus/manifest.json ] && tar -xJf $build/corpus_text.tar.xz -C $build
    # Kernels compiled on an earlier machine: 7 of the first run's 17 minutes went to compiling them.
    [ -f $build/triton_cache.tar.gz ] && mkdir -p ~/.triton && tar -xzf $build/triton_cache.tar.gz -C ~/.triton
    setsid nohup bash -c "
        python3 packaging/demo_model/train.py --device cuda --time-budget-minutes ${BUDGET_MINUTES:-17} \
            --max-shard-mb 15 --out $run ${TRAIN_ARGS:-}; echo \"train.py exit \$?\"
        python3 packaging/demo_model/evaluate.py --model $run/model --device cuda --trials ${TRIALS:-10} ${EVAL_ARGS:-}
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
