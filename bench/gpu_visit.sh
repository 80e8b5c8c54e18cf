#!/usr/bin/env bash
# One prepared, timed visit to a lent GPU machine (H100/H200): 4 calls of the device tool's
# `run`, back to back, about 8 GPU minutes in all, leaving room for one rerun.
#
# 1. Here, from the repo root (downloads the wheels into .devcarry/, splits DALI's into
#    60 MiB parts, copies ../shared/data to .devcarry/shared-data, prints the calls):
#        bash bench/gpu_visit.sh plan          # `plan --dry`: the same from nominal sizes
#        bash bench/gpu_visit.sh rehearse      # call 4's steps on this CPU; must exit 0
# 2. The calls exactly as `plan` printed them, each as soon as the one before returns (a
#    machine idle for 30 s is given back; no give_back in between):
#        call 1  carry [".devcarry/dali/part-00", ".devcarry/visit.sha256"]
#                command: bash bench/gpu_visit.sh receive part-00          timeout_s 60
#        call 2  the same with part-01;  call 3  the same with part-02
#        call 4  carry [".devcarry/dali/part-03", ".devcarry/visit.sha256", ".devcarry/dali/SHA256",
#                       ".devcarry/wheels", ".devcarry/device-install.sh", ".devcarry/shared-data"]
#                command: bash bench/gpu_visit.sh visit                    timeout_s 540
#    Every call's first output line says whether the parts sent before are in /tmp/dali
#    (sha256 checked); one starting MISSING means the machine was released: start again at
#    call 1. Call 4 runs install -> smoke -> gpu_tests -> dali_gpu -> kernels -> loader ->
#    end_to_end, each under `timeout`, teed into $OUT/<step>.log, every result merged into
#    $OUT/visit.json after its step; the output ends with one line per step.
# 3. Rerun: call 4 again while the machine is warm (install is then skipped), else calls
#    1-4 again. Then give_back.
#
# Python runs bench/gpu_visit.py as a script inside a work folder (/tmp/gpu-visit), never
# `python -m` from the repo root: there the source folder tcsmae/ (which lacks pipelines/
# and convert/, mapped by package-dir) would shadow the package installed in /tmp/site.
set -uo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
REPO=$PWD
DRIVER=$REPO/bench/gpu_visit.py
DALI_DIR=${VISIT_DALI_DIR:-/tmp/dali}
MANIFEST=.devcarry/visit.sha256
export PYTHONUNBUFFERED=1

die() { echo "$*"; exit "${2:-3}"; }

# The manifest's DALI parts, "SUM NAME" in order.
manifest_parts() { awk '$2 ~ /^dali\/part-/ {sub("^dali/", "", $2); print $1, $2}' "$MANIFEST" | sort -k2; }

# The first output line of every call: are the parts before $1 in $DALI_DIR, unchanged?
check_before() {
  local me=$1 ok="" bad="" n=0 total sum name
  [ -f "$MANIFEST" ] || die "MISSING $MANIFEST: carry it with every call (see: bash bench/gpu_visit.sh plan)"
  total=$(manifest_parts | wc -l)
  while read -r sum name; do
    [[ "$name" < "$me" ]] || continue
    n=$((n + 1))
    if [ ! -f "$DALI_DIR/$name" ]; then bad+=" $name (absent)"
    elif [ "$(sha256sum "$DALI_DIR/$name" | cut -d' ' -f1)" != "$sum" ]; then bad+=" $name (sha256 differs)"
    else ok+=" $name"; fi
  done < <(manifest_parts)
  if [ -n "$bad" ]; then
    die "MISSING before $me:$bad in $DALI_DIR (holds: $(ls "$DALI_DIR" 2>/dev/null | tr '\n' ' ')): the machine was released between calls; start again at call 1"
  fi
  echo "call $((n + 1)) of $total: parts before $me:${ok:- none (first call)}${ok:+ present, sha256 ok} in $DALI_DIR"
}

# Copy this call's part to $DALI_DIR and check it against the manifest.
receive_part() {
  local me=$1 want
  want=$(manifest_parts | awk -v me="$me" '$2 == me {print $1}')
  [ -n "$want" ] || die "MISSING $me in $MANIFEST"
  [ -f ".devcarry/dali/$me" ] || die "MISSING .devcarry/dali/$me: carry it in this call"
  mkdir -p "$DALI_DIR" && cp ".devcarry/dali/$me" "$DALI_DIR/" || die "FAILED to copy $me to $DALI_DIR"
  [ "$(sha256sum "$DALI_DIR/$me" | cut -d' ' -f1)" = "$want" ] || die "CORRUPT $me: sha256 differs from $MANIFEST"
  echo "received $me ($(du -m "$DALI_DIR/$me" | cut -f1) MiB, sha256 ok); $DALI_DIR holds: $(ls "$DALI_DIR" | tr '\n' ' ')"
}

# The real samples where the tests look (<repo>/../shared/data), checked against the manifest.
place_samples() {
  local data=$REPO/../shared/data
  if [ ! -f "$data/README.md" ]; then
    [ -d .devcarry/shared-data ] || die "MISSING .devcarry/shared-data: carry it in this call" 4
    mkdir -p "$data" && cp -r .devcarry/shared-data/. "$data/" || die "FAILED to copy the samples to $data" 4
  fi
  local list; list=$(awk '$2 ~ /^shared-data\// {sub("^shared-data/", "", $2); print $1 "  " $2}' "$MANIFEST")
  [ -n "$list" ] || die "MISSING sample lines in $MANIFEST" 4
  ( cd "$data" && sha256sum -c --quiet <<<"$list" ) || die "MISSING or changed samples in $data" 4
  echo "samples in $(readlink -f "$data"): $(grep -c . <<<"$list") files, sha256 ok"
}

# step NAME COMMAND...: under the step's limit, teed to $OUT/NAME.log, recorded in visit.json.
step() {
  local name=$1 limit t0 rc; shift
  limit=$("$PY" "$DRIVER" limit "$name")
  t0=$(date +%s.%N)
  echo "== $name (limit $limit s, $(date -u +%T) UTC)"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  "$PY" "$DRIVER" record --json "$OUT/visit.json" --stage "$name" --rc "$rc" --started "$t0" --log "$name.log"
  [ "$rc" = 0 ] || echo "== $name: exit $rc"
}

measured_steps() {  # $1 device, $2 sizes
  local s
  for s in smoke gpu_tests dali_gpu kernels loader end_to_end; do
    step "$s" "$PY" "$DRIVER" step "$s" --json "$OUT/visit.json" --work "$WORK" --device "$1" \
      --sizes "$2" ${MANIFEST_ARG:+--manifest "$MANIFEST_ARG"}
  done
}

what=${1:-help}
[ $# -gt 0 ] && shift
case "$what" in
  plan)
    if [ "${1:-}" = --dry ]; then exec python3 "$DRIVER" plan --dry; fi
    mkdir -p "$(git rev-parse --git-path info)"  # device-wheels.sh adds .devcarry/ to its exclude file
    log=$(mktemp)
    PART_MIB=${PART_MIB:-60} bash "$REPO/../shared/tools/device-wheels.sh" >"$log" 2>&1 \
      || { cat "$log"; die "device-wheels.sh failed" 2; }
    head -n 1 "$log"; rm -f "$log"
    rm -rf .devcarry/shared-data
    cp -rL "$REPO/../shared/data" .devcarry/shared-data && chmod -R u+w .devcarry/shared-data \
      || die "cannot copy ../shared/data" 2
    ( cd .devcarry && { sha256sum dali/part-*; find shared-data -type f -print0 | sort -z | xargs -0 sha256sum; } \
        >visit.sha256 ) || die "cannot write $MANIFEST" 2
    echo "samples: $(du -sh .devcarry/shared-data | cut -f1) in .devcarry/shared-data; manifest $MANIFEST"
    echo
    exec python3 "$DRIVER" plan
    ;;
  receive)  # calls 1-3, on the GPU machine
    me=${1:?usage: gpu_visit.sh receive part-NN}
    check_before "$me"
    receive_part "$me"
    ;;
  visit)  # the last call, on the GPU machine
    WORK=/tmp/gpu-visit; rm -rf "$WORK"; mkdir -p "$WORK"  # a rerun rebuilds the stores
    pre() { "$@" 2>&1 | tee -a "$WORK/preamble.txt"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || exit "$rc"; }
    last=$( [ -f "$MANIFEST" ] && manifest_parts | tail -n 1 | cut -d' ' -f2 )
    pre check_before "${last:-part-99}"
    pre receive_part "$last"
    cp .devcarry/dali/SHA256 "$DALI_DIR/" || die "MISSING .devcarry/dali/SHA256: carry it in this call"
    pre place_samples
    OUT=${OUT:-$(mktemp -d /tmp/gpu-visit-out.XXXXXX)}; mkdir -p "$OUT"
    PY=python3 MANIFEST_ARG=$REPO/$MANIFEST
    export TCSMAE_CACHE=$WORK/cache
    "$PY" "$DRIVER" init --json "$OUT/visit.json" --mode visit --device cuda --sizes visit \
      --preamble "$WORK/preamble.txt"
    if [ -f /tmp/site/env.sh ] && [ -z "${VISIT_REINSTALL:-}" ]; then
      "$PY" "$DRIVER" record --json "$OUT/visit.json" --stage install --skipped "already installed in /tmp/site (a rerun)"
    else
      step install bash .devcarry/device-install.sh
    fi
    # shellcheck disable=SC1091
    [ -f /tmp/site/env.sh ] && source /tmp/site/env.sh
    measured_steps cuda visit
    "$PY" "$DRIVER" summary --json "$OUT/visit.json"
    ;;
  rehearse)  # the last call's steps here, on the CPU, with small sizes
    sizes=rehearse
    [ "${1:-}" = --fast ] && sizes=tiny
    PY=${VISIT_PYTHON:-$REPO/.venv/bin/python}
    [ -x "$PY" ] || PY=python3
    OUT=${OUT:-$(mktemp -d /tmp/gpu-visit-rehearsal.XXXXXX)}; mkdir -p "$OUT"
    WORK=$(mktemp -d /tmp/gpu-visit-work.XXXXXX)
    MANIFEST_ARG=""
    [ -f "$MANIFEST" ] && MANIFEST_ARG=$REPO/$MANIFEST
    export TCSMAE_CACHE=$WORK/cache
    echo "rehearsal on the CPU (device cpu, sizes $sizes, $PY): no parts to check; out $OUT"
    "$PY" "$DRIVER" init --json "$OUT/visit.json" --mode rehearse --device cpu --sizes "$sizes"
    "$PY" "$DRIVER" record --json "$OUT/visit.json" --stage install --skipped "rehearsal: the local environment"
    measured_steps cpu "$sizes"
    "$PY" "$DRIVER" summary --json "$OUT/visit.json"
    rc=$?
    rm -rf "$WORK"
    exit $rc
    ;;
  *)
    awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"
    [ "$what" = help ] || exit 2
    ;;
esac
