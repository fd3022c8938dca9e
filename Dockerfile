# Service image: multi-stage, non-root, the same install as the README (pip install of this
# project). Runs `pricing-service serve`; the same image runs `sync-worker` with another command.
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --upgrade pip
COPY pyproject.toml README.md ./
COPY pricing ./pricing
COPY pricing_service ./pricing_service
COPY sync_worker ./sync_worker
RUN /opt/venv/bin/pip install --no-cache-dir '.[parquet]'

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app pricing && mkdir -p /app /data \
    && chown pricing /app /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PRICING_LISTEN=0.0.0.0:50051 \
    PRICING_RULE_STORE_URL=sqlite:////data/pricing.db \
    PRICING_LOG_FORMAT=json
USER pricing
WORKDIR /app
EXPOSE 50051 9464
ENTRYPOINT ["pricing-service"]
CMD ["serve"]
