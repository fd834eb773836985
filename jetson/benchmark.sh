#!/usr/bin/env bash
# Benchmark an engine on this device: trtexec with warm-up, percentiles, CUDA graphs and a per-inference
# trace (--exportTimes), while tegrastats samples power to a log.
#
#   jetson/benchmark.sh build/base/orin-int8 [BATCH] [SECONDS]
#
# Writes OUT/bench/{times.json,trtexec.log,tegrastats.log}. Turn them into a result row on any machine with
#   edgevit profile-device --trtexec-times OUT/bench/times.json --tegrastats OUT/bench/tegrastats.log \
#       --artifact OUT --machine "Jetson Orin Nano" -o results.jsonl
# Lock clocks first for stable numbers (see jetson/README.md): sudo nvpmodel -m 0 && sudo jetson_clocks
set -euo pipefail
OUT="${1:?usage: benchmark.sh EXPORT_DIR [BATCH] [SECONDS]}"
BATCH="${2:-1}"
SECONDS_="${3:-20}"
TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
[ -f "$OUT/engine.plan" ] || { echo "no $OUT/engine.plan: run build_engine.py $OUT first (jetson/ or the export's device/)" >&2; exit 2; }
mkdir -p "$OUT/bench"

INPUT=$(python3 -c 'import json,sys; e=json.load(open(sys.argv[1])); i=e["input"]; print(i["name"]+":"+"x".join(str(d) for d in [int(sys.argv[2])]+i["shape"][1:]))' "$OUT/export.json" "$BATCH")
SHAPES=()
if python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["input"]["shape"][0] == -1 else 1)' "$OUT/export.json"; then
  SHAPES=(--shapes="$INPUT")
fi

TEGRA_PID=""
if command -v tegrastats >/dev/null; then
  tegrastats --interval 100 --logfile "$OUT/bench/tegrastats.log" &
  TEGRA_PID=$!
else
  echo "tegrastats not found: no power log" >&2
fi
cleanup() { if [ -n "$TEGRA_PID" ]; then kill "$TEGRA_PID" 2>/dev/null || true; tegrastats --stop 2>/dev/null || true; fi; }
trap cleanup EXIT

"$TRTEXEC" --loadEngine="$OUT/engine.plan" "${SHAPES[@]}" \
  --warmUp=2000 --duration="$SECONDS_" --iterations=200 --avgRuns=100 \
  --percentile=50,90,99 --useCudaGraph --useSpinWait \
  --exportTimes="$OUT/bench/times.json" 2>&1 | tee "$OUT/bench/trtexec.log"
echo "wrote $OUT/bench/times.json, trtexec.log${TEGRA_PID:+, tegrastats.log}"
