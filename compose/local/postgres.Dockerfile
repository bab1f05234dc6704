# PostgreSQL from Debian's own package, for running the compose stack where no image registry is reachable
# (scripts/compose_smoke.sh builds it on the debootstrap base image). With a registry, docker-compose.yaml's
# postgres:17.2-alpine is the same service: same user, password, database, data folder and health check.
#   podman build -f compose/local/postgres.Dockerfile --build-arg BASE_IMAGE=localhost/inferplane-base:bookworm \
#       -t inferplane-postgres:dev compose/local
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* /var/lib/postgresql/15 /etc/postgresql/15 \
 && mkdir -p /var/lib/postgresql/data /run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /run/postgresql \
 && chmod 700 /var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
VOLUME /var/lib/postgresql/data
ENTRYPOINT ["/bin/sh", "/usr/local/bin/postgres-entrypoint.sh"]
