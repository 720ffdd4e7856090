#!/usr/bin/env bash
# Copy a directory of HDF5 shards to node-local disk: jobs/lib/stage_data.sh SRC DST
#
# Run once per node by megdet_main when STAGE_DATA=1 (srun --ntasks-per-node=1 under Slurm, mpirun
# with one slot per host under PBS). Thousands of ranks reading the same shards from Lustre/GPFS is a
# metadata storm; each node reading its own copy is not.
#
# The copy goes to a temporary name and is renamed when complete, so a killed job never leaves a
# half-copied DST that a later run would trust. A DST whose manifest.json equals SRC's is reused: a
# requeued job landing on the same node does not copy again.
set -euo pipefail

if (($# != 2)); then
    echo "usage: $0 SRC DST" >&2
    exit 2
fi
src=$1 dst=$2
host=$(hostname)

[[ -f $src/manifest.json ]] || { echo "[stage $host] $src has no manifest.json" >&2; exit 1; }
if [[ -f $dst/manifest.json ]] && cmp -s "$src/manifest.json" "$dst/manifest.json"; then
    echo "[stage $host] $dst is already a copy of $src" >&2
    exit 0
fi

mkdir -p "$(dirname "$dst")"
tmp=$(mktemp -d "$dst.partial.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# manifest.json last: it marks a complete copy (see the check above).
find "$src" -mindepth 1 -maxdepth 1 ! -name manifest.json -exec cp -R -- {} "$tmp"/ \;
cp -- "$src/manifest.json" "$tmp/manifest.json"
rm -rf "$dst"
mv "$tmp" "$dst"
trap - EXIT
echo "[stage $host] copied $src to $dst ($(du -sh "$dst" | cut -f1))" >&2
