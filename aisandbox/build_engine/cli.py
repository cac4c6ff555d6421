"""`aisandbox build-engine`: flags -> BuildRequest -> stages."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from aisandbox.artifacts import EngineDirError
from aisandbox.build_engine.errors import BuildEngineError
from aisandbox.build_engine.pipeline import BuildRequest, run_build
from aisandbox.build_engine.profiles import (
    DEFAULT_PROFILES_DIR,
    KV_PRECISIONS,
    SCHEDULER_POLICIES,
    WEIGHT_PRECISIONS,
)

__all__ = ["add_arguments", "run"]

# flag -> profile field it overrides
_OVERRIDES = {
    "max_batch_size": "max_batch_size",
    "max_num_tokens": "max_num_tokens",
    "max_input_len": "max_input_len",
    "max_seq_len": "max_seq_len",
    "kv_cache_fraction": "kv_cache_free_gpu_memory_fraction",
    "weights": "weights",
    "kv_cache_dtype": "kv_cache",
    "tp": "tp_size",
    "scheduler_policy": "scheduler_policy",
    "default_max_tokens": "default_max_tokens",
}


def _device_list(text: str) -> tuple[int, ...]:
    try:
        indices = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0 or 0,1; got {text!r}") from None
    if any(i < 0 for i in indices):
        raise argparse.ArgumentTypeError(f"GPU indices cannot be negative: {text!r}")
    return indices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare build-engine's flags."""
    parser.add_argument("--checkpoint", type=Path, required=True, help="local Hugging Face model folder")
    parser.add_argument(
        "--output", type=Path, default=None, help="engine directory to create (required unless --dry-run)"
    )
    parser.add_argument("--gpu", default="auto", help="'auto' (detect through NVML / nvidia-smi) or a profile name")
    parser.add_argument(
        "--device",
        type=_device_list,
        default=(0,),
        help="GPU index (as nvidia-smi numbers them) to build on, default 0; with --tp N either the first of N "
        "consecutive GPUs or N comma-separated indices",
    )
    parser.add_argument("--profiles-dir", type=Path, default=DEFAULT_PROFILES_DIR, help="GPU profile folder")
    parser.add_argument(
        "--calib-dataset",
        type=Path,
        default=None,
        help="local calibration dataset folder ('text' column), needed for fp8/int4_awq/int8_sq/"
        "fp8 or int8 KV; nothing is downloaded",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the memory plan; build nothing")
    parser.add_argument("--force", action="store_true", help="replace an existing --output directory")
    group = parser.add_argument_group("profile overrides")
    group.add_argument("--max-batch-size", type=int)
    group.add_argument("--max-num-tokens", type=int)
    group.add_argument("--max-input-len", type=int)
    group.add_argument("--max-seq-len", type=int)
    group.add_argument("--kv-cache-fraction", type=float, help="runtime share of free GPU memory for the KV cache")
    group.add_argument("--weights", choices=sorted(WEIGHT_PRECISIONS))
    group.add_argument(
        "--kv-cache-dtype",
        choices=sorted(KV_PRECISIONS),
        help="fp8 only with --weights fp8; int8 cannot be built by TensorRT-LLM 1.2 (refused with the reason)",
    )
    group.add_argument("--tp", type=int, help="tensor parallelism: GPUs one engine spans (1, 2, 4, 8)")
    group.add_argument("--scheduler-policy", choices=SCHEDULER_POLICIES, help="runtime capacity scheduler")
    group.add_argument("--default-max-tokens", type=int, help="max_tokens for requests that omit it")


def run(args: argparse.Namespace) -> int:
    """Run the build; return 0 on success, 2 on an error the operator must fix."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.output is None and not args.dry_run:
        print("aisandbox build-engine: error: --output is required (or --dry-run)", file=sys.stderr)
        return 2
    request = BuildRequest(
        checkpoint=args.checkpoint,
        output=args.output if args.output is not None else Path("engine"),
        gpu=args.gpu,
        overrides={field: getattr(args, flag) for flag, field in _OVERRIDES.items()},
        calib_dataset=args.calib_dataset,
        dry_run=args.dry_run,
        force=args.force,
        device_index=args.device[0],
        device_indices=args.device if len(args.device) > 1 else (),
        profiles_dir=args.profiles_dir,
    )
    try:
        run_build(request, say=lambda line: print(line, flush=True))
    except (BuildEngineError, EngineDirError) as exc:
        print(f"aisandbox build-engine: error: {exc}", file=sys.stderr)
        return 2
    return 0
