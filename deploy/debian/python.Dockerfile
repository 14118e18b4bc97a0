# A stand-in for python:3.11-slim built from Debian's packages, for hosts that cannot
# pull from Docker Hub. scripts/compose.sh imports a debootstrapped Debian bookworm
# (python3, python3-pip, python3-venv) as vidq-debian:bookworm and builds this on it;
# the Dockerfile's BASE argument then names the result.
ARG DEBIAN=vidq-debian:bookworm
FROM ${DEBIAN}
# A virtual environment first on PATH: `python` and `pip` are what python:3.11-slim has,
# and pip installs there, beside Debian's own Python packages rather than over them.
ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8
RUN python3 -m venv /opt/python && python -V && pip --version
CMD ["python3"]
