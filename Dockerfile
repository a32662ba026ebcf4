# racedit on a GPU host. Multi-stage: the build stage has pip and compilers, the final
# stage only the CUDA base, Python and the virtual environment.
ARG CUDA_BASE=nvidia/cuda:12.6.3-base-ubuntu24.04

FROM ${CUDA_BASE} AS build
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1
# A CUDA build of torch (the default Linux wheel on PyPI bundles its CUDA libraries).
ARG TORCH_SPEC=torch
RUN pip install --upgrade pip && pip install "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY server ./server
COPY export ./export
COPY cli ./cli
COPY clients ./clients
# Non-editable install: the bundled checkpoint ships inside the package (racedit.model/weights).
# EXTRAS=export,ray builds the image KubeRay runs (deploy/kuberay/rayservice.yaml).
ARG EXTRAS=export
RUN pip install ./clients/python ".[${EXTRAS}]" && python -c "import racedit.model as m; assert m.DEFAULT_CHECKPOINT.is_dir()"

FROM ${CUDA_BASE} AS runtime
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system racedit && useradd --system --gid racedit --home /home/racedit --create-home racedit \
    && mkdir -p /checkpoints && chown racedit:racedit /checkpoints
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RACEDIT_HOST=0.0.0.0 \
    RACEDIT_PORT=8000 \
    RACEDIT_DEVICE=auto
USER racedit
WORKDIR /home/racedit
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python3 -c "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('RACEDIT_PORT', '8000'), timeout=4).status == 200 else 1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["racedit", "serve"]
