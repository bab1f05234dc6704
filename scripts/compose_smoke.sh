#!/usr/bin/env bash
# The compose stack, really up, with podman on a machine without a Docker engine or an image registry (Debian 12,
# root; PyPI and Debian's mirror reachable). `make compose-smoke` runs it; it is not part of `make test` (minutes
# of builds on first use). It
#   1. installs what is missing (apt-get: podman, runc, debootstrap; podman-compose and the openai client in a
#      virtual environment of its own) and writes the containers.conf podman needs here (runc, no ulimits);
#   2. builds a Debian bookworm base image with debootstrap and imports it (skipped when the image exists);
#   3. builds the project's image from compose/Dockerfile on it (pip gets the host's CA bundle and find-links
#      folder: torch's CPU wheel), and PostgreSQL and Redis images from Debian packages (compose/local/);
#   4. brings the core stack up (no observability profile: the collector, Jaeger, Prometheus and Grafana are
#      registry images) with the CPU profile's executor, on a podman bridge network whose DNS resolves the
#      compose file's service names (falling back to host networking is not needed: see compose/README.md);
#   5. waits for every container's health check, creates a key, runs scripts/compose_smoke_client.py (the openai
#      client through Envoy's published port; the usage records in the stack's PostgreSQL);
#   6. tears everything down (containers, network, volumes) on exit, failure or not, and prints the times.
#
#   bash scripts/compose_smoke.sh            # build what is missing, run, tear down
#   bash scripts/compose_smoke.sh --rebuild  # rebuild the project's images (the base image stays cached)
#   bash scripts/compose_smoke.sh --keep     # leave the stack up afterwards (tear it down with --down)
#   bash scripts/compose_smoke.sh --down     # tear a kept stack down
#
# Settings (environment): INFERPLANE_SMOKE_STATE (default /var/tmp/inferplane-compose: containers.conf, the
# venv, the debootstrap folder while it is built), INFERPLANE_SMOKE_EDGE_PORT (default 18480: the edge's port
# on the host), INFERPLANE_TAG (default dev), INFERPLANE_SMOKE_HEALTH_DEADLINE_S (default 900).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
state="${INFERPLANE_SMOKE_STATE:-/var/tmp/inferplane-compose}"
tag="${INFERPLANE_TAG:-dev}"
edge_port="${INFERPLANE_SMOKE_EDGE_PORT:-18480}"
health_deadline="${INFERPLANE_SMOKE_HEALTH_DEADLINE_S:-900}"
base_image="localhost/inferplane-base:bookworm"
project="inferplane-smoke"
# The core stack with Triton on the CPU: every service but the observability and GPU profiles'.
services=(postgres redis metering tokenizer executor-cpu router gateway envoy)
rebuild=0 keep=0 down_only=0
for arg in "$@"; do
    case "$arg" in
        --rebuild) rebuild=1 ;;
        --keep) keep=1 ;;
        --down) down_only=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "compose_smoke: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

log() { printf '[compose-smoke %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
now() { date +%s; }
declare -A took=()
timed() {  # timed NAME COMMAND...: run it, remember how long it took
    local name="$1" t0
    shift
    t0="$(now)"
    "$@"
    took[$name]=$(( $(now) - t0 ))
    log "$name: ${took[$name]} s"
}

# --- 1. what podman needs here -------------------------------------------------------------------------------

install_tools() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)  # for the venv below
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            echo "compose_smoke: need ${missing[*]} (apt-get install, as root)" >&2
            exit 1
        fi
        log "apt-get install ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }
    fi
    mkdir -p "$state"
    # crun fails on this machine's hybrid cgroups; setting RLIMIT_NOFILE is not permitted; no systemd runs.
    cat > "$state/containers.conf" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    export CONTAINERS_CONF="$state/containers.conf"
    if [ ! -x "$state/venv/bin/podman-compose" ] || [ ! -x "$state/venv/bin/python" ] \
            || ! "$state/venv/bin/python" -c 'import openai' 2>/dev/null; then
        log "podman-compose and openai into $state/venv"
        python3 -m venv "$state/venv"
        "$state/venv/bin/pip" install -q "podman-compose==1.6.0" "openai>=1.40"
    fi
}

# --- 2. the base image ---------------------------------------------------------------------------------------

base_image() {
    if podman image exists "$base_image"; then
        log "base image $base_image exists (podman rmi it to rebuild)"
        return
    fi
    local dir="$state/rootfs"
    rm -rf "$dir"
    log "debootstrap bookworm into $dir"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libpython3.11 \
        bookworm "$dir" http://deb.debian.org/debian >"$state/debootstrap.log" 2>&1 \
        || { tail -20 "$state/debootstrap.log" >&2; exit 1; }
    tar -C "$dir" -c . | podman import --change 'CMD ["/bin/bash"]' - "$base_image" >/dev/null
    rm -rf "$dir"
}

# --- 3. the images -------------------------------------------------------------------------------------------

pip_setting() {  # the host's pip setting NAME (cert, find-links): PIP_<NAME>, else `pip config list`'s global.NAME
    local env_name="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
    if [ -n "${!env_name:-}" ]; then
        echo "${!env_name%% *}"
    else
        python3 -m pip config list 2>/dev/null | sed -n "s/^global\.$1='\([^ ']*\).*'$/\1/p" | head -n1
    fi
}

build_images() {
    local no_cache=() pip_args=() cert links
    [ "$rebuild" = 1 ] && no_cache=(--no-cache)
    cert="$(pip_setting cert)"
    links="$(pip_setting find-links)"
    if [ -n "$cert" ] && [ -f "$cert" ]; then
        pip_args+=(-v "$cert:/run/pip/ca-certificates.crt:ro" --build-arg PIP_CERT=/run/pip/ca-certificates.crt)
    fi
    if [ -n "$links" ] && [ -d "$links" ]; then
        pip_args+=(-v "$links:/run/pip/find-links:ro" --build-arg PIP_FIND_LINKS=/run/pip/find-links)
    fi
    log "build inferplane:$tag (compose/Dockerfile, target app, on $base_image)"
    podman build "${no_cache[@]}" -q -f compose/Dockerfile --ignorefile compose/Dockerfile.dockerignore \
        --target app --build-arg PYTHON_IMAGE="$base_image" "${pip_args[@]}" -t "localhost/inferplane:$tag" . >/dev/null
    local name
    for name in postgres redis; do
        log "build inferplane-$name:$tag (compose/local/$name.Dockerfile)"
        podman build "${no_cache[@]}" -q -f "compose/local/$name.Dockerfile" --build-arg BASE_IMAGE="$base_image" \
            -t "localhost/inferplane-$name:$tag" compose/local >/dev/null
    done
}

# --- 4-6. the stack ------------------------------------------------------------------------------------------

compose() {
    INFERPLANE_TAG="$tag" INFERPLANE_EDGE_PORT="$edge_port" \
        "$state/venv/bin/podman-compose" -p "$project" \
        -f compose/docker-compose.yaml -f compose/docker-compose.local.yaml --profile cpu "$@"
}

container() {  # the container of a service
    podman ps -a --filter "label=io.podman.compose.project=$project" \
        --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -n1
}

teardown() {
    log "tear down: containers, network, volumes of $project"
    compose down -v -t 10 >/dev/null 2>&1 || true
    # what podman-compose may leave behind (a container created but not started, the network)
    local ids
    ids="$(podman ps -aq --filter "label=io.podman.compose.project=$project")"
    [ -z "$ids" ] || podman rm -f -v $ids >/dev/null 2>&1 || true
    ids="$(podman volume ls -q --filter "label=io.podman.compose.project=$project")"
    [ -z "$ids" ] || podman volume rm -f $ids >/dev/null 2>&1 || true
    podman network rm -f "${project}_default" >/dev/null 2>&1 || true
}

check_bridge_dns() {
    # The compose file's service names must resolve between containers: podman's netavark backend with
    # aardvark-dns does that on a bridge network (Debian's podman brings both). CNI without the dnsname plugin
    # does not: say so instead of waiting for health checks that cannot pass.
    local backend
    backend="$(podman info --format '{{.Host.NetworkBackend}}')"
    if [ "$backend" != netavark ] || ! { [ -x /usr/lib/podman/aardvark-dns ] || command -v aardvark-dns >/dev/null; }; then
        echo "compose_smoke: podman's network backend is '$backend' without aardvark-dns: service names will not" \
             "resolve on the bridge network (apt-get install netavark aardvark-dns; podman system reset)" >&2
        exit 1
    fi
}

wait_healthy() {
    # podman 4.3 runs health checks from systemd timers, and no systemd runs here: run each container's check
    # ourselves until every one passes (podman-compose 1.6 does not wait on `service_healthy` with podman < 4.6;
    # the services retry their dependencies and `restart: unless-stopped` covers the rest).
    local t0 pending name c
    t0="$(now)"
    while :; do
        pending=()
        for name in "${services[@]}"; do
            c="$(container "$name")"
            if [ -z "$c" ] || ! podman healthcheck run "$c" >/dev/null 2>&1; then
                pending+=("$name")
            fi
        done
        [ "${#pending[@]}" = 0 ] && return 0
        if [ $(( $(now) - t0 )) -ge "$health_deadline" ]; then
            log "not healthy after ${health_deadline} s: ${pending[*]}"
            for name in "${pending[@]}"; do
                c="$(container "$name")"
                [ -z "$c" ] && continue
                log "--- $name ($c): $(podman inspect -f '{{.State.Status}} restarts={{.RestartCount}}' "$c") ---"
                podman logs --tail 30 "$c" 2>&1 | sed 's/^/    /'
            done
            return 1
        fi
        sleep 5
    done
}

result=FAIL
network_mode=""
finish() {
    local rc=$?
    set +e
    if [ "$rc" != 0 ] && [ -n "${took[up]:-}" ] && [ -n "${took[healthy]:-}" ]; then
        local name c  # failed after the stack was healthy: what the services said last
        for name in "${services[@]}"; do
            c="$(container "$name")"
            [ -z "$c" ] && continue
            log "--- $name ($c), last lines ---"
            podman logs --tail 15 "$c" 2>&1 | sed 's/^/    /'
        done
    fi
    if [ "$keep" = 1 ] && [ "$down_only" = 0 ]; then
        log "--keep: the stack stays up (edge on 127.0.0.1:$edge_port); bash scripts/compose_smoke.sh --down"
    else
        timed teardown teardown
    fi
    echo
    echo "compose smoke figures (podman $(podman --version 2>/dev/null | awk '{print $3}'), ${network_mode:-bridge} network; seconds):"
    local step
    for step in install base-image build up healthy client teardown; do
        [ -n "${took[$step]:-}" ] && printf '  %-11s %5s\n' "$step" "${took[$step]}"
    done
    if [ -n "${took[up]:-}" ] && [ -n "${took[healthy]:-}" ]; then
        printf '  %-11s %5s  (up + healthy: podman-compose up -d until every health check passes)\n' start \
            "$(( took[up] + took[healthy] ))"
    fi
    [ "$rc" = 0 ] || result=FAIL
    echo "compose smoke: $result"
    exit "$rc"
}

timed install install_tools
if [ "$down_only" = 1 ]; then
    teardown
    exit 0
fi
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
timed base-image base_image
timed build build_images
check_bridge_dns
teardown  # a stack left by an earlier --keep or a killed run
log "up: ${services[*]} (project $project, edge on 127.0.0.1:$edge_port)"
# podman-compose warns per service that podman 4.3 cannot wait on `service_healthy`, and podman that it has no
# systemd for health-check timers: both are expected here (wait_healthy runs the checks); keep them in a file.
up_stack() {
    compose up -d "${services[@]}" >"$state/compose-up.log" 2>&1 \
        || { tail -30 "$state/compose-up.log" >&2; return 1; }
}
timed up up_stack
timed healthy wait_healthy
network_mode="$(podman inspect -f '{{.HostConfig.NetworkMode}}' "$(container envoy)")"
log "all healthy; network mode: $network_mode (service names resolved by aardvark-dns)"
key="$(podman exec "$(container metering)" inferplane keys create --name compose-smoke \
    --config /etc/inferplane/stack.yaml | head -n1)"
[ -n "$key" ] || { log "no key was created"; exit 1; }
log "client: openai through Envoy at http://127.0.0.1:$edge_port/v1"
t0="$(now)"
INFERPLANE_SMOKE_API_KEY="$key" "$state/venv/bin/python" scripts/compose_smoke_client.py \
    --base-url "http://127.0.0.1:$edge_port/v1" \
    --psql "podman exec $(container postgres) psql -U inferplane -d inferplane"
took[client]=$(( $(now) - t0 ))
result=PASS
