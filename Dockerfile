# syntax=docker/dockerfile:1
# jobwatch operator image.
#
#   docker build -t jobwatch:dev .
#
# Two stages: the builder makes a wheel of jobwatch and a virtualenv with it
# and its pinned dependencies (all have binary wheels, so no compiler is
# needed); the final image is python:3.11-slim plus that virtualenv, running
# as the unprivileged user 65532 with a read-only root filesystem in mind.

FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
RUN python -m venv /opt/venv

# Dependencies first, from pyproject.toml alone, so that a code change does not
# reinstall them. The versions are pinned in pyproject.toml.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && pip install --no-cache-dir -r requirements.txt

# Then the package itself, as a wheel (README* matches nothing if the file is
# absent; setuptools only warns then).
COPY README* ./
COPY operator/ ./operator/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip install --no-cache-dir --no-deps /wheels/jobwatch-*.whl \
 && python -c "import jobwatch"


FROM python:3.11-slim

LABEL org.opencontainers.image.title="jobwatch" \
      org.opencontainers.image.description="Kubernetes operator that watches long-running jobs behind HTTP status endpoints" \
      org.opencontainers.image.licenses="Apache-2.0"

# Bytecode is compiled at install time in the builder; nothing is written at
# run time (the root filesystem is read-only in the Deployment).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp

# The venv's python links to /usr/local/bin/python3.11 of the same base image.
COPY --from=builder /opt/venv /opt/venv

USER 65532:65532
WORKDIR /tmp

# 8080: health (/healthz); 9090: Prometheus metrics (/metrics).
EXPOSE 8080 9090

ENTRYPOINT ["python", "-m", "jobwatch"]
