# Conveyor's image: one image for every process, the `conveyor` command as entry point.
#   docker run IMAGE coordinator --dsn postgresql://... --etcd http://etcd:2379
#   docker run IMAGE worker myapp.tasks:worker      (an image FROM this one adds the app)
#
# Stage 1 builds the wheel (pip wheel --no-deps .) and installs it with its dependencies
# into a virtualenv; stage 2 copies only that virtualenv onto a clean slim base and runs
# as an unprivileged user. tests/integration/observability/test_image_build.py builds and
# starts the wheel the same way, since containers cannot run on the CI machines.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# .dockerignore keeps tests, virtualenvs and VCS data out of the context.
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
    && python -m venv /opt/conveyor \
    && /opt/conveyor/bin/pip install --no-cache-dir /dist/conveyor-*.whl

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="Conveyor" \
      org.opencontainers.image.description="A gRPC-first distributed task queue on PostgreSQL" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 conveyor \
    && useradd --system --no-log-init --uid 10001 --gid conveyor \
       --create-home --home-dir /home/conveyor conveyor
COPY --from=build /opt/conveyor /opt/conveyor
ENV PATH=/opt/conveyor/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CONVEYOR_LISTEN=0.0.0.0:50051
# Numeric, so Kubernetes can verify runAsNonRoot.
USER 10001:10001
WORKDIR /home/conveyor
# gRPC (API, workers, health, reflection) and Prometheus metrics (--metrics-listen).
EXPOSE 50051 9464
# The coordinator's gRPC health service (exit 0 when SERVING). Worker containers have no
# gRPC port of their own: compose and Kubernetes turn this check off for them.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["conveyor", "health", "--coordinator", "127.0.0.1:50051"]
ENTRYPOINT ["conveyor"]
CMD ["--help"]
