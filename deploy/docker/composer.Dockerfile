# syntax=docker/dockerfile:1
# storyreel composer: scene images plus narration (piper, joe-us voice) or a music
# track become an H.264/AAC MP4, encoded by the ffmpeg that imageio-ffmpeg bundles.
# No torch, no system ffmpeg, no moviepy (only the tests' reference renderer, the `reference`
# extra, uses it). Build from the repository root:
#   docker build -f deploy/docker/composer.Dockerfile -t storyreel/composer:0.1.0 .

FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1 AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY protos/ protos/
COPY src/ src/
COPY services/composer/ services/composer/
# The gRPC stubs are generated here, never committed; grpcio-tools stays in this stage.
RUN pip install --no-cache-dir -c constraints.txt grpcio-tools \
 && find protos -name '*.proto' -exec python -m grpc_tools.protoc -Iprotos \
      --python_out=src --pyi_out=src --grpc_python_out=src {} + \
 && find protos/storyreel -mindepth 1 -type d -printf 'src/storyreel/%P/__init__.py\n' | xargs touch \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ./ ./services/composer \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1
RUN groupadd --system --gid 10001 storyreel \
 && useradd --system --uid 10001 --gid storyreel --home-dir /tmp --shell /usr/sbin/nologin storyreel
# Caption fonts for the scripts the packaged DejaVu Sans lacks, found under /usr/share/fonts
# (storyreel_composer.typefaces): Noto Sans CJK (Chinese, Japanese, Korean), Noto's core
# families (Devanagari, Thai, Bengali, Ethiopic and more) and Symbola (emoji in outline:
# libass, which burns the captions, draws no colour glyphs).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      fonts-noto-cjk=1:20220127+repack1-1 fonts-noto-core=20201225-1 fonts-symbola=2.60-1.1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
# Per-request working files go to /tmp (an emptyDir under a read-only root in Kubernetes).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    STORYREEL_COMPOSER_HOST=0.0.0.0 \
    STORYREEL_COMPOSER_PORT=50053
WORKDIR /opt/storyreel
USER 10001:10001
EXPOSE 50053
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-m", "storyreel.healthcheck", "--port-env", "STORYREEL_COMPOSER_PORT"]
ENTRYPOINT ["python", "-m", "storyreel_composer"]
