#!/usr/bin/env bash
# How the JSON files in this folder were made: the benchmark runs in docs/benchmarks*.md
# predate `recipes/benchmark.py --json`, so their markdown tables (printed by the suites)
# are parsed back, with the command, date and machine stated on each page.
# The ops page's wide table was split in two afterwards: re-importing it needs the table
# as the suite printed it (git history of docs/benchmarks.md).
# New runs: python recipes/benchmark.py SUITE ... --json docs/assets/bench/SUITE.json
# Then: python recipes/plot_benchmarks.py   (writes docs/assets/bench/SUITE.svg)
set -euo pipefail
cd "$(dirname "$0")/../../.."
imp() { python recipes/plot_benchmarks.py import-md "$@"; }
imp docs/benchmarks.md --suite ops --tables 0 \
  --command "python recipes/benchmark.py ops --threads 1 --repeats 2 --only detr mmfs1 mmfs4 mmfs16 mmfs16_n2048 mmfs30 unet" \
  --date "2026-11-29" --machine "shared x86_64 2-core VM, torch 2.13.0+cpu, fp32, 1 thread per implementation"
# sync.json: the two --json runs of 2026-12-08 merged (one table each), see docs/benchmarks_sync.md
# llm.json: written by the run itself (benchmark.py --json), see docs/benchmarks_llm.md
imp docs/benchmarks_vision.md --suite vision --tables 0 1 2 \
  --titles "width 256, auto backend" "width 256, reference backend" "width 384, auto backend" \
  --command "python recipes/benchmark.py vision --threads 1 [--backend reference | --width 384 --heads 6]" \
  --date "2026-11-29" --machine "shared 2-core CPU, torch 2.13.0+cpu, load average 6-8"
imp docs/benchmarks_unet.md --suite unet --tables 0 \
  --command "python recipes/benchmark.py unet --threads 1" \
  --date "2026-11-29" --machine "shared 2-core CPU, torch 2.13.0+cpu, diffusers 0.42"
imp docs/benchmarks_model.md --suite model --tables 0 \
  --command "python recipes/benchmark.py model --threads 1" \
  --date "2026-11-29" --machine "shared 2-core CPU, torch 2.13.0+cpu, 1 thread"
