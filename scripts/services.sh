#!/usr/bin/env bash
# Make sure the Redis and PostgreSQL the tests use are up; start what is missing.
set -uo pipefail

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "services: starting Redis on 127.0.0.1:6379" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --dir /tmp --logfile /tmp/vidq-redis.log
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "services: starting PostgreSQL on 127.0.0.1:5432" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
for _ in $(seq 1 30); do
    if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; then
        exit 0
    fi
    sleep 1
done
echo "services: Redis or PostgreSQL did not come up" >&2
exit 1
