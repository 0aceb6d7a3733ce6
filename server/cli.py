"""The `athena` console script: one entry point, one sub-command module per stage.

Each module named in `_COMMAND_MODULES` exposes `register(subparsers)`, which adds its
sub-commands and sets `func` (called with the parsed namespace, returning an exit code).
Modules are imported lazily so `athena --help` stays fast and a missing optional piece
(e.g. triton) only affects the commands that need it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (module, sub-commands it registers) — listed here so `athena --help` works without importing torch.
_COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "quantize.cli": ("quantize",),
    "server.eval_cli": ("eval",),
    "server.chat_cli": ("chat",),
    "server.serve_cli": ("serve",),
    "bench.cli": ("bench",),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="athena", description="Athena: quantize, evaluate, chat with and serve LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, commands in _COMMAND_MODULES.items():
        if only is not None and only not in commands:
            continue
        module = importlib.import_module(module_name)
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    known = {c for cs in _COMMAND_MODULES.values() for c in cs}
    parser = build_parser(only=command if command in known else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        if command is None or command not in known:
            parser = build_parser()
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError) as exc:  # bad input: a clear message, no traceback
        logging.getLogger("athena").debug("error", exc_info=True)
        print(f"athena {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
