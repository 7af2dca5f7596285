#!/usr/bin/env bash
# `make compose-demo`: the two-node demo under a real Docker engine (docs/compose.md).
#   KVWIRE_TOKEN=... deploy/compose/demo.sh
# 1. refuses at once without KVWIRE_TOKEN (compose's own check, before anything is built);
# 2. starts dockerd when no engine answers and this is root with dockerd installed;
# 3. the base image: the pinned python:3.11-slim if present or pullable, else one made once from the Debian
#    mirror (base-image.sh); KVWIRE_BASE=IMAGE names one;
# 4. the wheelhouse (wheelhouse.sh, cached in /var/cache/kvwire/wheels; KVWIRE_WHEELHOUSE=0: the build
#    downloads instead), then `docker build` (its layer cache makes a second build take seconds);
# 5. receiver and channel up and healthy, the sender's demo attached (its tables are this script's
#    output; JSON and PNG land in KVWIRE_DEMO_OUTPUT, default deploy/demo-output/), then everything down.
# KVWIRE_DEMO_SAMPLES (default 20, as `make demo`), COMPOSE_PROJECT_NAME (default kvwire),
# KVWIRE_DASHBOARD_PORT (default 8080). KVWIRE_KILL_RECEIVER_AFTER=S: SIGKILL the receiver's process S
# seconds into the demo (a crash, as the OOM killer would), to show the restart and the sender's retries.
set -euo pipefail
cd "$(dirname "$0")/../.."
say() { echo "compose-demo [+${SECONDS}s]: $*" >&2; }

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose=(docker-compose)
else
    say "no Docker Compose (docker compose v2, or docker-compose v1: apt-get install docker-compose)"; exit 1
fi
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-kvwire}
compose+=(-f deploy/docker-compose.yml)
"${compose[@]}" config -q || exit 2  # no KVWIRE_TOKEN: compose names it and stops here

if ! docker info >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null; then
        say "no Docker engine answers; starting dockerd (log: /var/log/kvwire-dockerd.log)"
        nohup dockerd >/var/log/kvwire-dockerd.log 2>&1 &
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    fi
    docker info >/dev/null 2>&1 || { say "no Docker engine (start one, or run as root with dockerd installed)"; exit 1; }
fi

base=${KVWIRE_BASE:-}
if [ -z "$base" ]; then
    pinned=$(sed -n 's/^ARG BASE=//p' deploy/Dockerfile)
    if docker image inspect "$pinned" >/dev/null 2>&1 || docker pull -q "$pinned" >/dev/null 2>&1; then
        base=$pinned
    else
        say "Docker Hub is out of reach: the base image comes from the Debian mirror"
        base=kvwire-base:bookworm
        deploy/compose/base-image.sh "$base" >&2
    fi
fi
if [ "${KVWIRE_WHEELHOUSE:-1}" != 0 ]; then
    deploy/compose/wheelhouse.sh "$base" >&2
else
    rm -f deploy/wheels/*.whl
fi

docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0  # the classic builder where there is no buildx
log=$(mktemp /tmp/kvwire-build.XXXXXX.log)
say "building kvwire:latest on $base (log: $log)"
start=$SECONDS
if ! docker build --force-rm -f deploy/Dockerfile --build-arg BASE="$base" -t kvwire:latest . >"$log" 2>&1; then
    grep -v -e '^ ---> ' -e '^Removing intermediate' "$log" | tail -25 >&2
    say "the image did not build (whole log: $log)"; exit 1
fi
say "image built in $((SECONDS - start)) s"

export KVWIRE_DEMO_OUTPUT=${KVWIRE_DEMO_OUTPUT:-$PWD/deploy/demo-output}
export KVWIRE_UID=${KVWIRE_UID:-$(id -u)}  # the sender writes the output as you
export COLUMNS=${COLUMNS:-$(tput cols 2>/dev/null || echo 160)}
mkdir -p "$KVWIRE_DEMO_OUTPUT"
trap '"${compose[@]}" down --remove-orphans --timeout 10 >/dev/null 2>&1' EXIT

"${compose[@]}" up -d --no-build receiver channel
for service in receiver channel; do
    container=$("${compose[@]}" ps -q "$service")
    until [ "$(docker inspect -f '{{.State.Health.Status}}' "$container")" = healthy ]; do
        if [ "$(docker inspect -f '{{.State.Running}}' "$container")" != true ]; then
            docker logs --tail 30 "$container" >&2; say "$service stopped before it became healthy"; exit 1
        fi
        sleep 1
    done
    say "$service healthy"
done

receiver=$("${compose[@]}" ps -q receiver)
if [ -n "${KVWIRE_KILL_RECEIVER_AFTER:-}" ]; then
    (sleep "$KVWIRE_KILL_RECEIVER_AFTER"
     kill -9 "$(docker inspect -f '{{.State.Pid}}' "$receiver")" && say "receiver process killed (SIGKILL)") &
    killer=$!
fi
status=0
"${compose[@]}" run --rm -T --no-deps sender || status=$?
# Only the killer: a dockerd this script started is a child too, and outlives the demo.
[ -z "${killer:-}" ] || wait "$killer"
say "receiver restarts: $(docker inspect -f '{{.RestartCount}}' "$receiver"); outputs in $KVWIRE_DEMO_OUTPUT"
exit $status
