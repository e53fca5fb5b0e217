#!/usr/bin/env bash
# The benchmarks of docs/BENCHMARKS.md, one section per table, each the command its table names.
#
#   scripts/bench.sh                 # every CPU section (several hours on 2 cores)
#   scripts/bench.sh auto quality    # only these sections
#   scripts/bench.sh --list          # the sections and their commands
#
# Every section writes its record, docs/results/<section>.json, and rewrites its part of the docs
# from it (python -m ssd_allreduce.bench report); sweep also its two plots, docs/img/. What else a
# section writes (run directories, plots, markdown) goes to results/bench-<date>/<section>/
# (SSD_BENCH_OUT=dir to choose).
# The emulated networks need root (network namespaces); the GPU table is scripts/bench_gpu.sh.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SSD_VENV:-$REPO/.venv}
OUT=${SSD_BENCH_OUT:-results/bench-$(date +%Y%m%d-%H%M%S)}
BENCH=(-m ssd_allreduce.bench)

# section name -> the benchmark's arguments (the output directory is added)
declare -A SECTION=(
  [sweep]="compare --bandwidths 10gbit 1gbit 100mbit --repeats 2 --epochs 5 --warmup-steps 20"
  [costmodel]="costmodel --model resnet50 --ranks 8 64 256 1024 --bandwidths 10gbit 25gbit 100gbit --sync-every 5 --delay 5"
  [ablation]="ablation --ranks 8 --sync-every 8 --epochs 20 --seeds 3 --warmup-steps 20"
  [overhead]="overhead"
  [compression]="compare --bandwidths 100mbit --epochs 5 --warmup-steps 20 --repeats 2 --ssd-configs 5:5 5:5/fp16 5:5/bf16 5:5/int8 --no-local-sgd"
  [compression-resnet]="compare --model resnet20 --data synthetic --bandwidths 20mbit --epochs 1 --warmup-steps 20 --repeats 2 --ssd-configs 5:5 5:5/int8 5:5/bf16 --no-local-sgd"
  [warmup]="compare --model resnet20 --data synthetic --bandwidths 100mbit --epochs 1 --warmup-steps 60 --ssd-configs 5:5 --no-local-sgd"
  [auto]="compare --bandwidths 1gbit 100mbit 20mbit --epochs 16 --warmup-steps 20 --ssd-configs 1:1 2:2 5:5 10:10 5:auto auto --no-local-sgd --repeats 3"
  [nodes]="compare --ranks 4 --nodes 2 --bandwidths 100mbit 20mbit --epochs 30 --warmup-steps 20 --repeats 2 --ssd-configs 5:5"
  [nodecost]="nodecost"
  [faults]="faults"
  [straggler]="compare --bandwidths 1gbit --epochs 4 --warmup-steps 20 --repeats 2 --ssd-configs 5:5 --no-local-sgd --slow-rank 1 --slow-fraction 0.5"
  [gpt]="--workload gpt --optimizers adamw sgd --bandwidths 100mbit"
  [gpt-delay]="--workload gpt --optimizers adamw sgd --shards shuffle --bandwidths 100mbit --ssd-configs 5:5 5:2 5:1 5:auto --ablation-config none --no-simulator"
  [gpt-schedule]="--workload gpt --optimizers adamw sgd --shards shuffle --bandwidths 100mbit --ssd-configs 5:5 --lr-schedule cosine --budget-factor 2 --ablation-config none --no-simulator"
  [quality]="quality --tasks regression --ranks 4 8 16 --optimizers sgd adamw --shards shuffle non-iid --seeds 3 --jobs 2 --out docs/results/quality.json"
  [quality-drift]="quality --tasks regression --ranks 4 8 16 --optimizers sgd adamw --shards non-iid shuffle --seeds 3 --variants sync 1:1 2:2 5:5 10:10 1:1+dc 2:2+dc 5:5+dc 10:10+dc --jobs 2 --out docs/results/quality-drift.json"
  [quality-drift-beta]="quality --tasks regression --ranks 4 16 --optimizers sgd --shards non-iid --seeds 3 --variants sync 1:1:0.5 2:2:0.5 1:1:0.5+dc 2:2:0.5+dc --jobs 2 --out docs/results/quality-drift-beta.json"
  [quality-moments]="quality --tasks regression --ranks 4 8 16 --optimizers adamw --shards non-iid shuffle --seeds 3 --variants sync 1:1 2:2 5:5 10:10 1:1+am 2:1+am 2:2+am 5:5+am 10:10+am 1:1+am+dc 2:2+am+dc 5:5+am+dc 10:10+am+dc --jobs 2 --out docs/results/quality-moments.json"
  [quality-moments-gpt]="quality --tasks gpt --ranks 4 --optimizers adamw --shards non-iid --seeds 3 --max-steps 300 --warmup-steps 30 --variants sync 2:2 5:5 2:2+am 5:5+am --jobs 2 --out docs/results/quality-moments-gpt.json"
  [quality-outer]="quality --tasks regression --ranks 4 16 --optimizers sgd adamw --shards shuffle non-iid --seeds 3 --variants sync 2:2 5:5 10:10 2:2:auto:auto:0.5/0.5 5:5:auto:auto:0.5/0.5 10:10:auto:auto:0.5/0.5 5:5:auto:auto:0.7/0.5 10:10:auto:auto:0.7/0.5 5:5:auto:auto:0.7/0.9 10:10:auto:auto:0.7/0.9 --jobs 2 --out docs/results/quality-outer.json"
  [quality-gpt-long]="quality --tasks gpt --ranks 4 --optimizers adamw sgd --shards shuffle --seeds 3 --max-steps 2000 --warmup-steps 100 --variants sync 2:2 5:5 --jobs 2 --out docs/results/quality-gpt-long.json"
  [quality-gpt-long-delay]="quality --tasks gpt --ranks 4 --optimizers adamw sgd --shards shuffle --seeds 3 --max-steps 2000 --warmup-steps 100 --variants sync 5:0 5:1 --jobs 2 --out docs/results/quality-gpt-long-delay.json"
  [quality-gpt-delay]="quality --tasks gpt --ranks 4 --optimizers adamw sgd --shards shuffle --seeds 3 --max-steps 300 --warmup-steps 30 --variants sync 5:0 5:1 5:2 5:5 5:5:1 --jobs 2 --out docs/results/quality-gpt-delay.json"
  [quality-gpt]="quality --tasks gpt --ranks 4 --optimizers adamw sgd --shards shuffle --seeds 3 --max-steps 300 --warmup-steps 30 --variants sync 2:2 5:5 5:5:0.5:1 --jobs 2 --out docs/results/quality-gpt.json"
  [quality-gpt-adamw]="quality --tasks gpt --ranks 4 --optimizers adamw --shards shuffle --seeds 3 --max-steps 300 --warmup-steps 30 --variants sync 5:0 5:1 5:1:auto:1 5:1:auto:1.5 5:1:1 5:1+am 5:1:auto:auto:0.5/0.5 --jobs 2 --out docs/results/quality-gpt-adamw.json"
  [quality-gpt-warmup]="quality --tasks gpt --ranks 4 --optimizers adamw sgd --shards shuffle --seeds 3 --max-steps 300 --warmup-steps 30 --variants sync 5:1 5:1@90 5:1@150 5:1@auto 5:5@auto --jobs 2 --out docs/results/quality-gpt-warmup.json"
  [quality-gpt-long-warmup]="quality --tasks gpt --ranks 4 --optimizers adamw sgd --shards shuffle --seeds 3 --max-steps 2000 --warmup-steps 100 --variants sync 5:1@auto 5:5@auto 5:1@500 --jobs 2 --out docs/results/quality-gpt-long-warmup.json"
  [quality-gpt-long-sgd-scale]="quality --tasks gpt --ranks 4 --optimizers sgd --shards shuffle --seeds 3 --max-steps 2000 --warmup-steps 100 --variants sync 5:1:auto:1.4 5:1:auto:2 --jobs 2 --out docs/results/quality-gpt-long-sgd-scale.json"
  [quality-gpt-long-sgd-scale-warmup]="quality --tasks gpt --ranks 4 --optimizers sgd --shards shuffle --seeds 3 --max-steps 2000 --warmup-steps 100 --variants sync 5:1:auto:1.4@500 --jobs 2 --out docs/results/quality-gpt-long-sgd-scale-warmup.json"
  [quality-digits]="quality --tasks digits --ranks 4 8 --optimizers sgd adamw --shards shuffle non-iid --seeds 3 --variants sync 1:1 2:1 2:2 5:0 5:1 5:5 10:10 --jobs 2 --out docs/results/quality-digits.json"
  [quality-gpt-ranks]="quality --tasks gpt --ranks 8 16 --optimizers adamw sgd --shards shuffle --seeds 2 --max-steps 300 --warmup-steps 30 --variants sync 5:1 5:5 --jobs 2 --out docs/results/quality-gpt-ranks.json"
  [quality-gpt-sgd-scale]="quality --tasks gpt --ranks 4 8 16 --optimizers sgd --shards shuffle --seeds 2 --max-steps 300 --warmup-steps 30 --variants sync 5:1 5:1:auto:1.4 --jobs 2 --out docs/results/quality-gpt-sgd-scale.json"
  [quality-gpt-sgd-lr]="quality --tasks gpt --ranks 4 8 16 --optimizers sgd --shards shuffle --seeds 2 --max-steps 300 --warmup-steps 30 --lr 0.14 --variants sync 5:1 --jobs 2 --out docs/results/quality-gpt-sgd-lr.json"
  [quality-gpt-long-ranks-sgd-lr]="quality --tasks gpt --ranks 8 --optimizers sgd --shards shuffle --seeds 2 --max-steps 2000 --warmup-steps 100 --lr 0.28 --variants sync 5:1@500 5:1:auto:1.4@500 --jobs 2 --out docs/results/quality-gpt-long-ranks-sgd-lr.json"
  [quality-outer-delay1]="quality --tasks regression --ranks 4 16 --optimizers sgd adamw --shards shuffle non-iid --seeds 3 --variants sync 2:1 5:1 2:1:auto:auto:0.7/0.5 5:1:auto:auto:0.7/0.5 --jobs 2 --out docs/results/quality-outer-delay1.json"
  [quality-gpt-outer]="quality --tasks gpt --ranks 4 --optimizers adamw sgd --shards shuffle --seeds 3 --max-steps 300 --warmup-steps 30 --variants sync 5:1 5:1:auto:auto:0.7/0.5 --jobs 2 --out docs/results/quality-gpt-outer.json"
  [quality-gpt-long-sgd-outer]="quality --tasks gpt --ranks 4 --optimizers sgd --shards shuffle --seeds 3 --max-steps 2000 --warmup-steps 100 --lr 0.28 --variants sync 5:1@500 5:1:auto:1:0.7/0.5@500 --jobs 2 --out docs/results/quality-gpt-long-sgd-outer.json"
  [quality-gpt-long-ranks-sgd-outer]="quality --tasks gpt --ranks 8 --optimizers sgd --shards shuffle --seeds 2 --max-steps 2000 --warmup-steps 100 --lr 0.28 --variants sync 5:1@500 5:1:auto:1:0.7/0.5@500 --jobs 2 --out docs/results/quality-gpt-long-ranks-sgd-outer.json"
  [quality-gpt-long-adamw-lr]="quality --tasks gpt --ranks 4 --optimizers adamw --shards shuffle --seeds 3 --max-steps 2000 --warmup-steps 100 --lr 0.0015 0.006 --variants sync --jobs 2 --out docs/results/quality-gpt-long-adamw-lr.json"
  [quality-gpt-long-sgd-lr]="quality --tasks gpt --ranks 4 --optimizers sgd --shards shuffle --seeds 3 --max-steps 2000 --warmup-steps 100 --lr 0.2 0.28 0.4 --variants sync 5:1@500 5:1:auto:1.4@500 --jobs 2 --out docs/results/quality-gpt-long-sgd-lr.json"
  [quality-gpt-long-adamw-outer]="quality --tasks gpt --ranks 4 8 --optimizers adamw --shards shuffle --seeds 2 --max-steps 2000 --warmup-steps 100 --variants sync 5:1@500 5:1:auto:auto:0.7/0.5@500 --jobs 2 --out docs/results/quality-gpt-long-adamw-outer.json"
  [quality-gpt-noniid-warmup]="quality --tasks gpt --ranks 4 --optimizers adamw sgd --shards non-iid --seeds 3 --max-steps 300 --warmup-steps 30 --variants sync 5:1 5:1@auto 5:1@90 --jobs 2 --out docs/results/quality-gpt-noniid-warmup.json"
  [quality-gpt-ranks-warmup]="quality --tasks gpt --ranks 8 16 --optimizers adamw sgd --shards shuffle --seeds 2 --max-steps 300 --warmup-steps 30 --variants sync 5:1@auto 5:5@auto --jobs 2 --out docs/results/quality-gpt-ranks-warmup.json"
  [quality-gpt-long-ranks]="quality --tasks gpt --ranks 8 --optimizers adamw --shards shuffle --seeds 2 --max-steps 2000 --warmup-steps 100 --variants sync 5:1@auto 5:1@500 --jobs 2 --out docs/results/quality-gpt-long-ranks.json"
  [quality-gpt-long-ranks-sgd]="quality --tasks gpt --ranks 8 --optimizers sgd --shards shuffle --seeds 2 --max-steps 2000 --warmup-steps 100 --variants sync 5:1@auto 5:1@500 --jobs 2 --out docs/results/quality-gpt-long-ranks-sgd.json"
  [quality-gpt-long-ranks-sgd-scale]="quality --tasks gpt --ranks 8 --optimizers sgd --shards shuffle --seeds 2 --max-steps 2000 --warmup-steps 100 --variants sync 5:1:auto:1.4@500 5:1:auto:2@500 --jobs 2 --out docs/results/quality-gpt-long-ranks-sgd-scale.json"
)
ORDER=(costmodel nodecost overhead ablation quality quality-drift quality-drift-beta quality-moments quality-moments-gpt quality-outer quality-outer-delay1 quality-gpt-outer quality-gpt quality-gpt-ranks quality-gpt-sgd-scale quality-gpt-sgd-lr quality-gpt-long quality-gpt-long-delay quality-gpt-delay quality-gpt-adamw quality-gpt-warmup quality-gpt-long-warmup quality-gpt-long-sgd-scale quality-gpt-long-sgd-scale-warmup quality-gpt-ranks-warmup quality-gpt-long-ranks quality-gpt-long-ranks-sgd quality-gpt-long-ranks-sgd-scale quality-gpt-long-sgd-lr quality-gpt-long-ranks-sgd-lr quality-gpt-long-adamw-lr quality-gpt-long-sgd-outer quality-gpt-long-ranks-sgd-outer quality-gpt-long-adamw-outer quality-gpt-noniid-warmup quality-digits sweep compression compression-resnet warmup auto straggler nodes gpt gpt-delay gpt-schedule faults)
# docs/RELIABILITY.md's fault matrix: every fault on every backend, measured by its test
FAULTS=(-m pytest -p no:cacheprovider -s tests/e2e/test_faults.py -k lost_rank)

# How long a section took when its committed record was measured (2 cores), "?" without a record
last_took() {
  local record="$REPO/docs/results/$1.json"
  if [ -f "$record" ]; then
    python3 -c 'import json, sys; s = json.load(open(sys.argv[1])).get("seconds")
print(f"{s / 60:.0f} min" if s else "?")' "$record"
  else
    echo "?"
  fi
}

if [ "${1:-}" = --list ]; then
  printf '%-20s %-8s %s\n' section took command
  for name in "${ORDER[@]}"; do
    if [ "$name" = faults ]; then
      printf '%-20s %-8s SSD_FAULT_MATRIX=full python %s\n' "$name" "$(last_took "$name")" "${FAULTS[*]}"
    else
      printf '%-20s %-8s python %s %s\n' "$name" "$(last_took "$name")" "${BENCH[*]}" "${SECTION[$name]}"
    fi
  done
  exit 0
fi
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=("${ORDER[@]}")
for name in "${wanted[@]}"; do
  [ -n "${SECTION[$name]+set}" ] || { echo "bench.sh: no section '$name'; choose from: ${ORDER[*]}" >&2; exit 2; }
done
total=0 unknown=()
for name in "${wanted[@]}"; do
  took=$(last_took "$name")
  if [ "$took" = "?" ]; then unknown+=("$name"); else total=$((total + ${took% min})); fi
done
if [ ${#unknown[@]} -lt ${#wanted[@]} ]; then
  echo "bench.sh: about $total min on 2 cores as last recorded${unknown[*]:+, plus ${unknown[*]} (not timed yet)}" >&2
else
  echo "bench.sh: ${unknown[*]}: not timed yet" >&2
fi

"$REPO/scripts/setup.sh" >&2
cd "$REPO"
for name in "${wanted[@]}"; do
  mkdir -p "$OUT/$name"
  # shellcheck disable=SC2206  # the section's arguments are words
  args=(${SECTION[$name]})
  case "$name" in
    costmodel|nodecost|overhead|ablation)
      "$VENV/bin/python" "${BENCH[@]}" "${args[@]}" --record "docs/results/$name.json" | tee "$OUT/$name/table.md"
      "$VENV/bin/python" "${BENCH[@]}" report ;;
    # results committed under docs/results/, and the documents' sections written from them
    # (one command a line: under set -e a failure inside an && list would not stop the run)
    quality*)
      "$VENV/bin/python" "${BENCH[@]}" "${args[@]}"
      "$VENV/bin/python" "${BENCH[@]}" report ;;
    faults)
      SSD_FAULT_MATRIX=full SSD_FAULT_RECORD="$REPO/docs/results/faults.json" "$VENV/bin/python" "${FAULTS[@]}" |
        tee "$OUT/$name/pytest.log"
      "$VENV/bin/python" "${BENCH[@]}" report ;;
    # the comparisons whose sections are written from their record
    sweep|warmup|auto|nodes|compression|compression-resnet|straggler|gpt|gpt-delay|gpt-schedule)
      "$VENV/bin/python" "${BENCH[@]}" "${args[@]}" --out "$OUT/$name" --record "docs/results/$name.json"
      "$VENV/bin/python" "${BENCH[@]}" report
      if [ "$name" = sweep ]; then cp "$OUT/$name/throughput_vs_bandwidth.png" "$OUT/$name/accuracy_vs_time.png" docs/img/; fi ;;
  esac
done
echo "bench.sh: results in $OUT"
