# Redis from Debian's own package, for running the compose stack where no image registry is reachable
# (scripts/compose_smoke.sh builds it on the debootstrap base image). With a registry, docker-compose.yaml's
# redis:7.4-alpine is the same service.
#   podman build -f compose/local/redis.Dockerfile --build-arg BASE_IMAGE=localhost/inferplane-base:bookworm \
#       -t inferplane-redis:dev compose/local
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/*
USER redis
WORKDIR /var/lib/redis
EXPOSE 6379
# No configuration file: Redis's built-in defaults, reachable from the other containers (the compose network
# is the boundary, as with redis:7.4-alpine, whose image turns protected mode off the same way).
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]
