# PostgreSQL from Debian's packages, for hosts that cannot pull postgres:16-alpine from
# Docker Hub (deploy/compose.debian.yml). It keeps the official image's contract that
# docker-compose.yml relies on: POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB read
# when the data volume is first initialised, the scripts in /docker-entrypoint-initdb.d
# run then, password logins over TCP, and pg_isready on PATH (the health check).
ARG DEBIAN=vidq-debian:bookworm
FROM ${DEBIAN}
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/lib/postgresql/15 \
    && mkdir -p /var/lib/postgresql/data /docker-entrypoint-initdb.d \
    && chown postgres:postgres /var/lib/postgresql/data && chmod 700 /var/lib/postgresql/data \
    && mkdir -p /run/postgresql && chmod 1777 /run/postgresql
# docker-compose.yml mounts a tmpfs on /var/run/postgresql: it takes this directory's
# mode (1777) but root's ownership, so postgres can write its socket there.
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /var/lib/postgresql/data
USER postgres
EXPOSE 5432
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
