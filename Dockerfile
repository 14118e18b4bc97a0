# One Dockerfile, three images (docker-compose.yml builds them):
#   producer  the base install (+ the PostgreSQL driver): vidq submit/status/results...; no torch
#   monitor   producer + flower: `celery -A worker.tasks flower`; no torch
#   worker    '.[worker,postgres]': torch, PyTorchVideo and PyAV; runs `vidq worker`
#
#   docker build --target worker -t vidq-worker .
#
# On linux/amd64 the default PyPI torch wheel is a CUDA build, so the worker image
# runs on GPU hosts (NVIDIA driver + container toolkit) and falls back to CPU.
# PyAV's wheels bundle FFmpeg: no system packages are needed.
#
# Build arguments (BuildKit; scripts/compose.sh passes them where they are needed):
#   BASE             the Python 3.11 image everything starts from (default python:3.11-slim);
#                    without Docker Hub, scripts/compose.sh builds one from Debian's
#                    packages (deploy/debian/python.Dockerfile) and passes it here.
#   WORKER_PIP_ARGS  extra arguments to the worker's pip install: a CPU-only image is
#                    `--extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu`.
# Behind a TLS-inspecting proxy, `--secret id=pip_cert,src=/path/to/ca-bundle.crt` gives
# pip its CA bundle for the RUN that installs, never in a layer of the image.

ARG BASE=python:3.11-slim
FROM ${BASE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 vidq \
    && useradd --system --uid 10001 --gid vidq --create-home --home-dir /home/vidq vidq
WORKDIR /src
# Dependencies are installed from pyproject.toml alone, against empty packages, so
# that editing the code does not reinstall torch; the code is installed after.
COPY pyproject.toml ./
# (every package pyproject.toml lists must exist, empty).
RUN mkdir -p vidq/migrations/versions vidq/viewer worker producer \
    && touch README.md vidq/__init__.py worker/__init__.py producer/__init__.py


FROM base AS producer
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && pip install ".[postgres,s3,export]"
COPY . .
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && pip install --no-deps --force-reinstall . \
    && python -c "import vidq.cli, producer.submit"
WORKDIR /home/vidq
USER vidq
ENTRYPOINT ["vidq"]
CMD ["--help"]


FROM producer AS monitor
USER root
WORKDIR /src
# Flower imports the Celery app (worker.tasks), which must import with what is here.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && pip install ".[postgres,monitor]" \
    && python -c "import worker.tasks"
WORKDIR /home/vidq
USER vidq
ENTRYPOINT ["celery"]
CMD ["-A", "worker.tasks", "flower", "--address=0.0.0.0", "--port=5555"]


FROM base AS worker
ARG WORKER_PIP_ARGS=""
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && pip install ".[worker,postgres,s3]" $WORKER_PIP_ARGS
COPY . .
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && pip install --no-deps --force-reinstall .
# The torch hub cache (pretrained checkpoints) lives on a volume mounted here; the
# directory exists in the image so that a fresh named volume is owned by vidq.
ENV TORCH_HOME=/cache/torch \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VIDQ_MEDIA_ROOTS=/media
RUN mkdir -p /cache/torch /media && chown vidq:vidq /cache/torch
WORKDIR /home/vidq
USER vidq
# SIGTERM is Celery's warm shutdown: running jobs finish, then the worker exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vidq"]
CMD ["worker"]
