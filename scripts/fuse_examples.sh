#!/usr/bin/env bash
# Train the three shipped example concepts (robot, cat, cactus) on the embedded tiny model, then
# fuse them with configs/fuse_example.yaml: the README's fusion section, end to end.
#
#   scripts/fuse_examples.sh                       # about a minute per concept on a CPU
#   scripts/fuse_examples.sh --max-steps 5         # extra arguments go to every `mixofshow train`
#   scripts/fuse_examples.sh --overwrite           # again, replacing the runs of a previous call
#
# Outputs go under runs/ of the current directory (runs/robot, runs/cat, runs/cactus,
# runs/fused/example.safetensors), where configs/fuse_example.yaml looks for them. MIXOFSHOW
# names the command to run (default: `python -m mixofshow`, from the environment you are in).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
read -r -a mixofshow <<< "${MIXOFSHOW:-python -m mixofshow}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's package, also without -e
for config in example cat cactus; do
  "${mixofshow[@]}" train "$root/configs/$config.yaml" "$@"
done
"${mixofshow[@]}" fuse "$root/configs/fuse_example.yaml"
echo "sample it: mixofshow sample --concept runs/fused/example.safetensors --prompts $root/datasets/prompts/multi.txt"
