#!/usr/bin/env bash
# Real CT volumes for benchmarks, cached in .cache/real-ct/ (gitignored): the test scans that the
# TotalSegmentator 2.18.0 source package ships under tests/reference_files/ (Apache-2.0 code; the scans are
# its public example data). Phantoms alone cannot tell whether the tokenizer copes with real anatomy, noise
# and fields of view; these are the only real CTs reachable through an ordinary package client.
#
#   scripts/fetch-real-ct.sh [--force] [--inspect]
#
# Idempotent: with every case present and matching its sha256 it only lists the cache (well under a second).
# Otherwise it runs `pip download --no-deps --no-binary :all: TotalSegmentator==2.18.0` (the venv's pip if
# there is one), extracts only the CT volumes, checks each against the sha256 below (a changed download is
# refused, nothing is replaced) and writes .cache/real-ct/cases.tsv (case_id, path, sha256, patient, note).
# --force re-downloads; --inspect also prints size, spacing, HU range and direction (SimpleITK).
# CTVQ_REAL_CT overrides the cache folder.
#
# What the package holds (SimpleITK, LPS; sizes x y z; "cube mm" = voxel edge after ctvq's resampling of the
# longest axis into the 64^3 / 128^3 cube):
#
# | case_id                 | size          | spacing mm      | HU range     | direction    | cube mm @64/@128 |
# |-------------------------|---------------|-----------------|--------------|--------------|------------------|
# | ts_example_ct           | 122x101x112   | 3.0 3.0 3.0     | -1207..3382  | diag(-1,-1,1)| 5.72 / 2.86      |
# | ts_example_ct_sm        | 122x101x30    | 3.0 3.0 3.0     | -1100..1207  | diag(-1,-1,1)| 5.72 / 2.86      |
# | ts_aorta_ct             | 233x167x191   | 1.5 1.5 1.5     | -1094..3343  | identity     | 5.46 / 2.73      |
# | ts_aorta_ct_cropped     | 120x126x164   | 1.5 1.5 1.5     | -1078..3343  | identity     | 3.84 / 1.92      |
# | ts_pulmonary_ct_cropped | 122x102x112   | 1.5 1.5 1.5     | -1064..3343  | identity     | 2.86 / 1.43      |
# | ts_dicom_ct (20 files)  | 512x512x20    | 0.977 0.977 2.0 | -1024..1839  | identity     | 7.81 / 3.91      |
#
# There are only THREE patients, and most files overlap (checked voxel by voxel):
# - patient A, abdomen/pelvis at 3 mm, no lungs in view: ts_example_ct. ts_example_ct_sm is exactly its
#   last 30 slices (identical HU), and its longest axis is the same, so its cube is a strict sub-slab of
#   ts_example_ct's at the same scale: nearly redundant (90 mm thick, ~16 voxels at 64^3).
# - patient B, contrast chest/upper abdomen at 1.5 mm: ts_aorta_ct (aorta_report/example_ct.nii.gz;
#   aorta_report/test_result/models/ct.nii.gz is the same bytes, skipped). ts_aorta_ct_cropped is its
#   sub-volume at voxel offset (72, 13, 0), 33 % of it; ts_pulmonary_ct_cropped lies inside that crop at
#   (0, 0, 24), 19 % of the full scan. Both crops match the parent to ~0.1 HU mean (not bit-identical:
#   91 % / 90 % of voxels equal). Their smaller fields of view give finer cube voxels (1.4x, 1.9x).
# - patient C, upper abdomen (liver), arms down: ts_dicom_ct, the DICOM series example_ct_dicom/ (not in
#   the NIfTI list; ctvq reads DICOM folders). A 40 mm slab: only ~5 voxels thick at 64^3.
# Crops and slabs are padded with air in the cube, so their cut faces become (artificial) surfaces in any
# window whose iso lies above air. Left out: example_mr_sm (MR) and every segmentation (*seg*, organ masks).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${CTVQ_REAL_CT:-$root/.cache/real-ct}
version=2.18.0
ref=totalsegmentator-$version/tests/reference_files
sdist_sha=5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03

# case_id | member under $ref | sha256 (a DICOM folder: sha256 of its sorted per-file `sha256sum` lines) |
# patient | note
cases=(
  "ts_example_ct|example_ct.nii.gz|dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1|A|abdomen-pelvis 3 mm"
  "ts_example_ct_sm|example_ct_sm.nii.gz|e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb|A|last 30 slices of ts_example_ct"
  "ts_aorta_ct|aorta_report/example_ct.nii.gz|372d98723e3283a8d4a0ae2f0ef1e581c0ad17b673b30b2e8d3e215180cc2a12|B|contrast chest 1.5 mm"
  "ts_aorta_ct_cropped|aorta_report/test_result/models/ct_cropped.nii.gz|f776ecfa1326e7e21a8c30e5530f517c16f16a59a68fc06e8119cefc7c3b87a0|B|crop of ts_aorta_ct"
  "ts_pulmonary_ct_cropped|pulmonary_report/models/ct_cropped.nii.gz|4da078fe43c9aa4d358903ac95105cea4fbe93b029474e4701bdde4db72126eb|B|crop of ts_aorta_ct_cropped"
  "ts_dicom_ct|example_ct_dicom|cb296a70a6457e000d4244a78eec9240766a55f4aaf7b41682619bc30d617810|C|DICOM upper abdomen 40 mm slab"
)
duplicates=("aorta_report/test_result/models/ct.nii.gz=ts_aorta_ct")

force=0 inspect=0 tmp=""
trap '[ -z "$tmp" ] || rm -rf "$tmp"' EXIT
for arg in "$@"; do
  case $arg in
    --force) force=1 ;;
    --inspect) inspect=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "fetch-real-ct: unknown argument $arg (use --force, --inspect)" >&2; exit 2 ;;
  esac
done

digest() {  # digest PATH: sha256 of a file, or of a folder's sorted per-file checksum lines
  if [ -d "$1" ]; then
    (cd "$1" && find . -maxdepth 1 -type f -printf '%f\n' | LC_ALL=C sort | xargs -d '\n' sha256sum) \
      | sha256sum | cut -d' ' -f1
  else
    sha256sum "$1" | cut -d' ' -f1
  fi
}

target() {  # target CASE_ID MEMBER: where a case lives in the cache
  if [[ $2 == *.nii.gz ]]; then echo "$cache/$1.nii.gz"; else echo "$cache/$1"; fi
}

cache_ok() {
  local entry id member sha
  [ -f "$cache/cases.tsv" ] || return 1
  for entry in "${cases[@]}"; do
    IFS='|' read -r id member sha _ _ <<<"$entry"
    local path; path=$(target "$id" "$member")
    [ -e "$path" ] && [ "$(digest "$path")" = "$sha" ] || return 1
  done
}

pip_cmd() {
  if [ -x "$root/.venv/bin/pip" ]; then echo "$root/.venv/bin/pip"; else echo "python3 -m pip"; fi
}

fetch() {
  local entry id member sha dup
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/fetch-real-ct.XXXXXX")  # global: the EXIT trap needs it
  echo "fetch-real-ct: pip download TotalSegmentator==$version (sdist) into $tmp" >&2
  $(pip_cmd) download --quiet --no-deps --no-binary :all: "TotalSegmentator==$version" -d "$tmp" >&2
  local sdist="$tmp/totalsegmentator-$version.tar.gz"
  [ -f "$sdist" ] || { echo "fetch-real-ct: pip did not leave $sdist" >&2; exit 1; }
  [ "$(digest "$sdist")" = "$sdist_sha" ] \
    || echo "fetch-real-ct: note: the sdist's sha256 differs from $sdist_sha; checking each scan" >&2
  local members=()
  for entry in "${cases[@]}"; do IFS='|' read -r _ member _ _ _ <<<"$entry"; members+=("$ref/$member"); done
  for dup in "${duplicates[@]}"; do members+=("$ref/${dup%%=*}"); done
  tar -xzf "$sdist" -C "$tmp" "${members[@]}"
  for entry in "${cases[@]}"; do  # check everything before replacing anything
    IFS='|' read -r id member sha _ _ <<<"$entry"
    local got; got=$(digest "$tmp/$ref/$member")
    [ "$got" = "$sha" ] || { echo "fetch-real-ct: $member: sha256 $got, expected $sha (the package" \
      "changed; inspect it and update this script)" >&2; exit 1; }
  done
  for dup in "${duplicates[@]}"; do
    for entry in "${cases[@]}"; do
      IFS='|' read -r id member sha _ _ <<<"$entry"
      [ "$id" = "${dup#*=}" ] || continue
      if [ "$(digest "$tmp/$ref/${dup%%=*}")" = "$sha" ]; then
        echo "fetch-real-ct: skipped ${dup%%=*}: same bytes as $id" >&2
      else
        echo "fetch-real-ct: note: ${dup%%=*} is no longer a copy of $id (not extracted)" >&2
      fi
    done
  done
  mkdir -p "$cache"
  printf 'case_id\tpath\tsha256\tpatient\tnote\n' >"$tmp/cases.tsv"
  for entry in "${cases[@]}"; do
    IFS='|' read -r id member sha patient note <<<"$entry"
    local path; path=$(target "$id" "$member")
    rm -rf "$path.partial" "$path"
    cp -r "$tmp/$ref/$member" "$path.partial" && mv "$path.partial" "$path"
    printf '%s\t%s\t%s\t%s\t%s\n' "$id" "$(basename "$path")" "$sha" "$patient" "$note" >>"$tmp/cases.tsv"
  done
  mv "$tmp/cases.tsv" "$cache/cases.tsv"
}

if [ "$force" = 1 ] || ! cache_ok; then
  fetch
else
  echo "fetch-real-ct: cache complete, nothing to do" >&2
fi

echo "real CT cases in $cache:"
while IFS=$'\t' read -r id path sha patient note; do
  [ "$id" = case_id ] && continue
  printf '  %-24s %-28s %6s  patient %s  %s\n' "$id" "$path" "$(du -sh "$cache/$path" | cut -f1)" \
    "$patient" "$note"
done <"$cache/cases.tsv"

if [ "$inspect" = 1 ]; then
  py="$root/.venv/bin/python"; [ -x "$py" ] || py=python3
  "$py" - "$cache" <<'EOF'
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

cache = Path(sys.argv[1])
for line in (cache / "cases.tsv").read_text().splitlines()[1:]:
    case, name = line.split("\t")[:2]
    path = cache / name
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    hu = sitk.GetArrayViewFromImage(image)
    size, spacing = image.GetSize(), image.GetSpacing()
    extent = max(n * s for n, s in zip(size, spacing))
    print(f"{case:24s} size {'x'.join(map(str, size)):12s} spacing {' '.join(f'{s:.3g}' for s in spacing):14s}"
          f" HU {int(hu.min())}..{int(hu.max())}  direction {np.round(image.GetDirection(), 3).tolist()}"
          f"  cube mm @64 {extent / 64:.2f} @128 {extent / 128:.2f}")
EOF
fi
