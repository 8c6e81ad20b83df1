"""The `twinkle` command: `twinkle serve` and `twinkle check-config`."""

from __future__ import annotations

import argparse
import logging
import sys


def _serve(args: argparse.Namespace) -> int:
    from twinkle.config import load_config
    from twinkle.http.server import serve_forever

    config = load_config(args.config, host=args.host, port=args.port, state_dir=args.state_dir, model=args.model)
    serve_forever(config)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from twinkle.config import load_config

    try:
        config = load_config(args.file)
        config.check_secure()
    except (ValidationError, ValueError, OSError) as exc:
        print(f"{args.file}: invalid configuration\n{exc}", file=sys.stderr)
        return 1
    models = ", ".join(f"{m.name} ({m.backend}, {m.num_workers} worker(s))" for m in config.models)
    print(f"{args.file}: OK — serves {models} on {config.host}:{config.port}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twinkle", description="Twinkle: multi-tenant LoRA training server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server in the foreground")
    serve.add_argument("--config", help="YAML server config (see `twinkle check-config`)")
    serve.add_argument("--model", help="serve this model (built-in name, HF id or local folder)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--state-dir", help="where the database and checkpoints live (default ./twinkle_state)")
    serve.set_defaults(func=_serve)
    check = sub.add_parser("check-config", help="validate a server config file")
    check.add_argument("file")
    check.set_defaults(func=_check_config)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"twinkle: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
