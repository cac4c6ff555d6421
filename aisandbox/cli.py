"""The `aisandbox` command: `serve`, `build-engine`, `bench`, `prepare-model`.

Each subcommand lives with its part of the package and exposes `add_arguments(parser)` and `run(args)`;
this module only wires them together, importing each lazily so `aisandbox --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# subcommand -> (module, one-line help)
_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("aisandbox.serve", "serve the OpenAI API with gunicorn (default: SmolLM2-135M-Instruct on CPU)"),
    "prepare-model": ("aisandbox.serve", "convert the default model once into a cached Hugging Face folder"),
    "build-engine": ("aisandbox.build_engine.cli", "compile a TensorRT-LLM engine for this GPU type"),
    "bench": ("aisandbox.bench.cli", "benchmark the latency of an OpenAI-compatible endpoint"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse argv and run one subcommand; return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="aisandbox", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv and argv[0] in _COMMANDS else None
    for name, (module_name, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            getattr(module, "add_arguments" if name != "prepare-model" else "add_prepare_arguments")(p)
    args = parser.parse_args(argv)
    module = importlib.import_module(_COMMANDS[args.command][0])
    runner = getattr(module, "run" if args.command != "prepare-model" else "run_prepare")
    return int(runner(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
