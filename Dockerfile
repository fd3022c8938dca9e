# Service image: multi-stage, non-root (numeric UID 10001, so Kubernetes' runAsNonRoot can
# verify it), the same install as the README (pip install of this project). Runs
# `pricing-service serve`; the same image runs `sync-worker` with another command.
#
#   docker build -t crowd-pricing .                              # on python:3.11-slim
#   buildah bud --build-arg BASE_IMAGE=localhost/my-base -t crowd-pricing .
#
# BASE_IMAGE: any Debian-like image with python3 (>= 3.11) and its venv module, ca-certificates
# and useradd (tests/integration/test_image.py builds on a debootstrapped Debian bookworm).
# EXTRAS: the project's optional dependencies to install ("parquet": Parquet snapshots).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG EXTRAS=parquet
WORKDIR /src
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --upgrade pip
COPY pyproject.toml README.md ./
COPY pricing ./pricing
COPY pricing_service ./pricing_service
COPY sync_worker ./sync_worker
RUN /opt/venv/bin/pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"

FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 pricing \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin pricing \
    && mkdir -p /app /data && chown 10001:10001 /app /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/app \
    PRICING_LISTEN=0.0.0.0:50051 \
    PRICING_METRICS_ADDR=0.0.0.0 \
    PRICING_WORKER_METRICS_ADDR=0.0.0.0 \
    PRICING_RULE_STORE_URL=sqlite:////data/pricing.db \
    PRICING_LOG_FORMAT=json
USER 10001:10001
WORKDIR /app
VOLUME ["/data"]
EXPOSE 50051 9464 9465
ENTRYPOINT ["pricing-service"]
CMD ["serve"]
