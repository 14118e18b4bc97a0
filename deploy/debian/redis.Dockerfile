# Redis from Debian's package, for hosts that cannot pull redis:7-alpine from Docker Hub
# (deploy/compose.debian.yml). What docker-compose.yml relies on: `redis-server` on
# PATH taking its settings (--requirepass...) as arguments, data in /data, and
# redis-cli reading its password from REDISCLI_AUTH (the health check).
ARG DEBIAN=vidq-debian:bookworm
FROM ${DEBIAN}
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && mkdir -p /data && chown redis:redis /data
# A fresh named volume takes the owner of /data: redis starts as redis, without the
# official image's root entrypoint that needs SETUID and SETGID.
VOLUME /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
