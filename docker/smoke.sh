#!/usr/bin/env bash
# Build the tcsmae image from this repository's Dockerfile and run it end to end:
#   1 build             docker build (time, image size)
#   2 help              docker run tcsmae --help; runs as the non-root user; /cache empty, writable
#   3 pretrain-noargs   docker run tcsmae pretrain (the paper's config on the embedded phantom,
#                       built into a fresh cache volume): it starts, names its device, trains a
#                       step; then docker stop -t 300: exit 143 (whether last.pt was saved is shown)
#   4 pretrain-demo     pretrain --preset demo --epochs 1 --steps-per-epoch 3 on the same
#                       cache volume (the phantom is reused, not rebuilt): exit 0, last.pt
#   5 stop              a demo run stopped with docker stop -t 60 mid-epoch: exit 143, last.pt
#   6 resume            pretrain --resume RUN/checkpoints/last.pt finishes that epoch: exit 0
#   7 convert           convert a real DICOM series (copied to a temporary folder) to a store
#   8 finetune          one tiny fold from scratch on that store: exit 0, results.json
# It prints a summary (exit code of each step, image size) and removes its containers,
# volume and temporary folder. Exit status 0 only when every step passed.
#
#   docker/smoke.sh [--base IMAGE] [--image TAG] [--dicom DIR] [--ca-cert FILE.pem]
#                   [--no-cache | --no-build] [--keep]
#
#   --base IMAGE      base image (env BASE_IMAGE; default: the Dockerfile's, debian:bookworm-slim).
#                     Without a registry: docker/make-base.sh, then --base tcsmae-base:bookworm
#   --image TAG       image to build and run (env TCSMAE_IMAGE; default tcsmae)
#   --dicom DIR       a DICOM CT series (env DICOM_DIR; default: shared/data/totalseg-dicom-series
#                     beside or inside the repository). DIR-seg.nii.gz, when present, is its label map.
#   --ca-cert FILE    extra root certificate(s) for pip inside the build (a TLS-inspecting proxy)
#   --no-cache        build every layer afresh (docker build --no-cache), for a build time
#   --no-build        run an image built before
#   --keep            keep the temporary folder and cache volume (their paths are printed)
# Env: NOARG_STEP_TIMEOUT (s to wait for the no-argument run's first step, default 1200),
#      SMOKE_MEMORY (docker --memory for the runs, e.g. 16g; default: no limit),
#      SMOKE_GPUS (docker --gpus for the runs: auto = all when nvidia-smi lists a GPU, none, all, ...).
# Needs a running Docker engine; the build uses host networking to reach PyPI and Debian.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_IMAGE=${BASE_IMAGE:-}
IMAGE=${TCSMAE_IMAGE:-tcsmae}
DICOM_DIR=${DICOM_DIR:-}
CA_CERT=""
BUILD=1
NO_CACHE=0
KEEP=0
NOARG_STEP_TIMEOUT=${NOARG_STEP_TIMEOUT:-1200}
SMOKE_MEMORY=${SMOKE_MEMORY:-}
SMOKE_GPUS=${SMOKE_GPUS:-auto}

while [ $# -gt 0 ]; do
  case "$1" in
    --base) BASE_IMAGE=$2; shift 2 ;;
    --image) IMAGE=$2; shift 2 ;;
    --dicom) DICOM_DIR=$2; shift 2 ;;
    --ca-cert) CA_CERT=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --no-cache) NO_CACHE=1; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "smoke.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -z "$DICOM_DIR" ]; then
  for d in "$REPO/shared/data/totalseg-dicom-series" "$REPO/../shared/data/totalseg-dicom-series"; do
    [ -d "$d" ] && DICOM_DIR=$(cd "$d" && pwd) && break
  done
fi
[ -n "$DICOM_DIR" ] && [ -d "$DICOM_DIR" ] || { echo "smoke.sh: no DICOM series: pass --dicom DIR" >&2; exit 2; }
docker info >/dev/null 2>&1 || { echo "smoke.sh: no Docker engine answers (start dockerd)" >&2; exit 2; }

TAG=tcsmae-smoke-$$
WORK=$(mktemp -d "${TMPDIR:-/tmp}/$TAG.XXXXXX")
CACHE_VOL=$TAG-cache
LOG=$WORK/logs
mkdir -p "$LOG"
chmod 0777 "$WORK"   # the image's user (uid 1000) writes here through -v "$WORK":/data
RUN_OPTS=(-v "$WORK":/data)
[ -n "$SMOKE_MEMORY" ] && RUN_OPTS+=(--memory "$SMOKE_MEMORY")
GPU_OPTS=()
case "$SMOKE_GPUS" in
  auto) command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && GPU_OPTS=(--gpus all) ;;
  none) ;;
  *) GPU_OPTS=(--gpus "$SMOKE_GPUS") ;;
esac

cleanup() {
  docker rm -f "$TAG-noargs" "$TAG-stop" >/dev/null 2>&1
  if [ "$KEEP" = 1 ]; then
    echo "kept: $WORK and volume $CACHE_VOL"
  else
    # The container's user owns what it wrote: remove that from inside.
    docker run --rm -v "$WORK":/data --entrypoint sh "$IMAGE" -c 'rm -rf /data/* /data/.[!.]*' >/dev/null 2>&1
    rm -rf "$WORK"
    docker volume rm "$CACHE_VOL" >/dev/null 2>&1
  fi
}
trap cleanup EXIT

SUMMARY=()
FAILED=0
record() {  # record NAME EXPECTED_RC RC SECONDS [CHECK_FAILURE]
  local name=$1 want=$2 rc=$3 secs=$4 why=${5:-}
  why=${why#; }
  local verdict=PASS
  if [ "$rc" != "$want" ] || [ -n "$why" ]; then verdict=FAIL; FAILED=1; fi
  SUMMARY+=("$(printf '%-16s exit %-4s (want %-3s) %6ss  %s %s' "$name" "$rc" "$want" "$secs" "$verdict" "$why")")
  echo "== $name: exit $rc (want $want) in ${secs}s: $verdict $why"
}
runlog() {  # runlog NAME CMD... : run, tee to $LOG/NAME.log, return the exit code
  local name=$1; shift
  echo "\$ $*" | sed "s#$WORK#\$WORK#g"
  "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  tail -n 4 "$LOG/$name.log" | sed 's/^/    /'
  return $rc
}
has() { grep -qE "$2" "$LOG/$1.log"; }
line() { grep -m1 -E "$2" "$LOG/$1.log" | cut -c1-200; }
wait_for() {  # wait_for CONTAINER TIMEOUT TEST... : poll TEST until true or the container ends
  local c=$1 t=$2; shift 2
  local end=$((SECONDS + t))
  while [ $SECONDS -lt $end ]; do
    "$@" && return 0
    [ "$(docker inspect -f '{{.State.Running}}' "$c" 2>/dev/null)" = true ] || { "$@"; return; }
    sleep 5
  done
  return 1
}
logs_have() { docker logs "$1" 2>&1 | grep -qE "$2"; }
lines_in() { [ -f "$1" ] && [ "$(wc -l < "$1")" -ge "$2" ]; }

echo "repository $REPO; image $IMAGE; base ${BASE_IMAGE:-the default of the Dockerfile}; work $WORK"
echo "docker $(docker version -f '{{.Server.Version}}' 2>/dev/null), storage driver $(docker info -f '{{.Driver}}' 2>/dev/null)," \
     "GPU: ${GPU_OPTS[*]:-none}"

# 1 build ---------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  BUILD_ARGS=(--network host)
  [ -n "$BASE_IMAGE" ] && BUILD_ARGS+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  [ "$NO_CACHE" = 1 ] && BUILD_ARGS+=(--no-cache)
  SHOWN="docker build ${BUILD_ARGS[*]}"
  [ -n "$CA_CERT" ] && SHOWN="$SHOWN --build-arg EXTRA_CA_CERTS=\"\$(cat $CA_CERT)\""
  [ -n "$CA_CERT" ] && BUILD_ARGS+=(--build-arg "EXTRA_CA_CERTS=$(cat "$CA_CERT")")
  echo "\$ $SHOWN -t $IMAGE $REPO"
  t0=$SECONDS
  docker build "${BUILD_ARGS[@]}" -t "$IMAGE" "$REPO" > "$LOG/build.log" 2>&1
  rc=$?
  tail -n 2 "$LOG/build.log" | sed 's/^/    /'
  record build 0 $rc $((SECONDS - t0))
  [ $rc = 0 ] || { echo "build failed: $LOG/build.log"; KEEP=1; exit 1; }
fi
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE" 2>/dev/null) || { echo "no image $IMAGE"; exit 1; }
SIZE_TEXT="$(awk "BEGIN{printf \"%.2f GB (%.2f GiB)\", $SIZE/1e9, $SIZE/2^30}")"
echo "image $IMAGE: $SIZE_TEXT"

# 2 help, user ---------------------------------------------------------------------------
t0=$SECONDS
runlog help docker run --rm "$IMAGE" --help; rc=$?
USER_ID=$(docker run --rm --entrypoint id "$IMAGE" -u 2>/dev/null)
why=""
has help 'pretrain' && has help 'finetune' || why="--help lists no pretrain/finetune"
[ "$USER_ID" != 0 ] || why="$why; runs as root"
docker run --rm --entrypoint sh "$IMAGE" -c 'test -w /cache && test -z "$(ls -A /cache)"' \
  || why="$why; /cache not empty and writable"
record help 0 $rc $((SECONDS - t0)) "$why"
echo "    user id in the image: $USER_ID"

# 3 pretrain with no arguments: starts, names the device, trains a step, stops cleanly --------
t0=$SECONDS
echo "\$ docker run -d -v \$WORK:/data -v $CACHE_VOL:/cache ${GPU_OPTS[*]} $IMAGE pretrain"
docker run -d --name "$TAG-noargs" "${RUN_OPTS[@]}" -v "$CACHE_VOL":/cache "${GPU_OPTS[@]}" "$IMAGE" pretrain >/dev/null
why=""
if wait_for "$TAG-noargs" 900 logs_have "$TAG-noargs" '^pretraining '; then
  echo "    started after $((SECONDS - t0))s; waiting for the first step (up to ${NOARG_STEP_TIMEOUT}s)"
  wait_for "$TAG-noargs" "$NOARG_STEP_TIMEOUT" lines_in "$WORK/runs/pretrain/metrics.jsonl" 1 \
    && echo "    first step logged after $((SECONDS - t0))s" || why="no step logged"
else
  why="no start summary"
fi
docker stop -t 300 "$TAG-noargs" >/dev/null
rc=$(docker wait "$TAG-noargs")
docker logs "$TAG-noargs" > "$LOG/pretrain-noargs.log" 2>&1
tail -n 3 "$LOG/pretrain-noargs.log" | sed 's/^/    /'
has pretrain-noargs 'building the embedded phantom default' || why="$why; phantom not built in the fresh volume"
has pretrain-noargs '^pretraining mit_b2 at 256x256 .* on (cpu|cuda)' || why="$why; start summary names no device"
# last.pt is required of the stop step below; here, with steps of a minute on a busy CPU, the
# run may still be busy when tcsmae's own grace period after SIGTERM (120 s) ends.
if [ -f "$WORK/runs/pretrain/checkpoints/last.pt" ]; then NOARG_SAVED="last.pt saved"
else NOARG_SAVED="no last.pt (busy past the 120 s grace after SIGTERM)"; fi
echo "    $NOARG_SAVED"
record pretrain-noargs 143 "$rc" $((SECONDS - t0)) "$why"
NOARG_START=$(line pretrain-noargs '^pretraining ')
docker rm "$TAG-noargs" >/dev/null

# 4 a short pretraining on the cached phantom ------------------------------------------------
t0=$SECONDS
runlog pretrain-demo docker run --rm "${RUN_OPTS[@]}" -v "$CACHE_VOL":/cache "${GPU_OPTS[@]}" "$IMAGE" \
  pretrain --preset demo --epochs 1 --steps-per-epoch 3 --out /data/pretrain-demo; rc=$?
why=""
has pretrain-demo 'training on the embedded phantom default' || why="phantom not reused from the volume"
has pretrain-demo 'building the embedded phantom' && why="$why; phantom rebuilt"
has pretrain-demo '^pretraining mit_b0 at 128x128 .* on (cpu|cuda)' || why="$why; start summary names no device"
[ -f "$WORK/pretrain-demo/checkpoints/last.pt" ] || why="$why; no last.pt"
record pretrain-demo 0 $rc $((SECONDS - t0)) "$why"

# 5 docker stop mid-run leaves last.pt -------------------------------------------------------
t0=$SECONDS
STOP_ARGS=(pretrain --preset demo --epochs 1 --steps-per-epoch 40 --checkpoint-every 0 --out /data/pretrain-stop)
echo "\$ docker run -d -v \$WORK:/data -v $CACHE_VOL:/cache $IMAGE ${STOP_ARGS[*]}; docker stop -t 60 (after 3 steps)"
docker run -d --name "$TAG-stop" "${RUN_OPTS[@]}" -v "$CACHE_VOL":/cache "${GPU_OPTS[@]}" "$IMAGE" "${STOP_ARGS[@]}" >/dev/null
why=""
wait_for "$TAG-stop" 600 lines_in "$WORK/pretrain-stop/metrics.jsonl" 3 || why="fewer than 3 steps logged"
docker stop -t 60 "$TAG-stop" >/dev/null
rc=$(docker wait "$TAG-stop")
docker logs "$TAG-stop" > "$LOG/stop.log" 2>&1
tail -n 2 "$LOG/stop.log" | sed 's/^/    /'
[ -f "$WORK/pretrain-stop/checkpoints/last.pt" ] || why="$why; no last.pt"
has stop 'continue with tcsmae pretrain --resume' || why="$why; no resume hint"
STOP_STEPS=$(wc -l < "$WORK/pretrain-stop/metrics.jsonl" 2>/dev/null || echo 0)
record stop 143 "$rc" $((SECONDS - t0)) "$why"
docker rm "$TAG-stop" >/dev/null

# 6 --resume continues from there ----------------------------------------------------------
t0=$SECONDS
runlog resume docker run --rm "${RUN_OPTS[@]}" -v "$CACHE_VOL":/cache "${GPU_OPTS[@]}" "$IMAGE" \
  pretrain --resume /data/pretrain-stop/checkpoints/last.pt; rc=$?
why=""
has resume '^resuming from /data/pretrain-stop/checkpoints/last.pt after step [1-9]' || why="did not resume mid-epoch"
has resume '^done: 40 steps' || why="$why; did not finish at step 40"
record resume 0 $rc $((SECONDS - t0)) "$why"

# 7 convert a real DICOM series ------------------------------------------------------------
t0=$SECONDS
cp -r "$DICOM_DIR" "$WORK/dicom"
LABELS=()
if [ -f "${DICOM_DIR%/}-seg.nii.gz" ]; then
  cp "${DICOM_DIR%/}-seg.nii.gz" "$WORK/seg.nii.gz"
  LABELS=(--labels /data/seg.nii.gz)
fi
chmod -R a+rX "$WORK/dicom"
runlog convert docker run --rm "${RUN_OPTS[@]}" "$IMAGE" convert /data/dicom "${LABELS[@]}" -o /data/s.zarr; rc=$?
why=""
[ -d "$WORK/s.zarr" ] || why="no store"
record convert 0 $rc $((SECONDS - t0)) "$why"

# 8 one tiny fine-tuning fold on that store -------------------------------------------------
t0=$SECONDS
if [ ${#LABELS[@]} -gt 0 ]; then
  # TotalSegmentator ids present in the series: liver 5, spleen 1, aorta 52.
  echo '{"name": "smoke", "classes": {"liver": [5], "spleen": [1], "aorta": [52]}}' > "$WORK/labels.json"
  MAP=(--labels-map /data/labels.json)
else
  MAP=()
fi
runlog finetune docker run --rm "${RUN_OPTS[@]}" "${GPU_OPTS[@]}" "$IMAGE" finetune --data /data/s.zarr \
  --out /data/ft --init scratch --encoder mit_b0 --folds 1 --epochs 1 --size 64 --batch-size 4 \
  --lr 1e-3 "${MAP[@]}"; rc=$?
why=""
[ -f "$WORK/ft/results.json" ] || why="no results.json"
record finetune 0 $rc $((SECONDS - t0)) "$why"

# summary ------------------------------------------------------------------------------------
echo
echo "== summary: image $IMAGE, $SIZE_TEXT"
echo "no-argument start: $NOARG_START"
echo "no-argument run after docker stop: $NOARG_SAVED"
echo "stopped run: $STOP_STEPS step(s) logged before docker stop"
printf '%s\n' "${SUMMARY[@]}"
[ "$FAILED" = 0 ] && echo "smoke: all steps passed" || { echo "smoke: FAILED (logs in $LOG)"; KEEP=1; }
exit $FAILED
