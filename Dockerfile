# syntax=docker/dockerfile:1
# The twinhub image: the `twinhub` command (gateway, twin projector, init, health, ...) in a
# virtual environment, run as a non-root user. Built by compose.yaml; checked statically by
# tests/test_compose.py (there is no Docker engine in CI).
#
#   docker build -t twinhub .
#   docker run --rm twinhub --help

ARG PYTHON_IMAGE=python:3.11-slim

# -- build: install the project (not its dev extra) into /opt/twinhub ------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/twinhub
WORKDIR /src
# .dockerignore keeps the context to pyproject.toml, README.md and the packages.
COPY . .
RUN /opt/twinhub/bin/pip install . \
 && /opt/twinhub/bin/twinhub --help > /dev/null

# -- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# The directories compose mounts volumes on belong to the twinhub user: a new named volume
# mounted there takes their owner and mode, so the `init` service can write into it. /data:
# keys and certificates; /bus: the full bus credential set (init only); /export/<process>: the
# secrets of one process each (twinhub init --bus-export; the two mongo ones group-readable:
# the mongo container reads them as mongodb:twinhub); /run/twinhub/bus: where a service
# finds its own (TWINHUB_NATS_CREDENTIALS).
RUN groupadd --system --gid 10001 twinhub \
 && useradd --system --uid 10001 --gid twinhub --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin twinhub \
 && install -d -o twinhub -g twinhub -m 0750 /data \
 && install -d -o twinhub -g twinhub -m 0700 /bus /run/twinhub/bus \
      /export/gateway /export/twin /export/callout /export/admin /export/nats \
 && install -d -o twinhub -g twinhub -m 0750 /export/mongo /export/mongo-initdb
COPY --from=build /opt/twinhub /opt/twinhub
ENV PATH=/opt/twinhub/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /data
USER twinhub:twinhub
# CoAP over TCP and over TLS (RFC 8323); CoAP over UDP and over DTLS (simple devices:
# gateway.udp, gateway.dtls); the operations endpoints (/metrics, /healthz, /readyz) of the
# gateway, the twin service and the auth callout when gateway.metrics_listen /
# twin.metrics_listen / callout.metrics_listen are set
EXPOSE 5683/tcp 5684/tcp 5683/udp 5684/udp 9464/tcp 9465/tcp 9466/tcp
ENTRYPOINT ["twinhub"]
CMD ["--help"]
