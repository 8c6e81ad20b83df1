"""The `twinkle` command: `twinkle serve` and `twinkle check-config`."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("twinkle.cli")


def _serve(args: argparse.Namespace) -> int:
    from twinkle.preflight import check_models, load_checked

    # Everything that can be checked without Ray is checked first: a wrong model or key fails in a
    # second with one line, not after Ray, Serve and a worker have started.
    config = load_checked(args.config, host=args.host, port=args.port, state_dir=args.state_dir, model=args.model)
    config.check_runnable()
    for source in check_models(config):
        log.info("model %s: %s", source.name, source.describe())

    from twinkle.http.server import serve_forever

    serve_forever(config)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from twinkle.preflight import PreflightError, check_models, load_checked

    try:
        config = load_checked(args.file)
        sources = check_models(config)
    except PreflightError as exc:
        for line in exc.lines:
            print(line if line.startswith(args.file) else f"{args.file}: {line}", file=sys.stderr)
        return 1
    try:
        config.check_runnable()
    except ValueError as exc:  # valid, but needs a backend this build does not have yet
        print(f"{args.file}: note: this build cannot run it yet: {exc}")
    keys = config.resolved_keys()
    def layout(m) -> str:
        par = m.parallelism
        ranks = (f" of TP={par.tensor_parallel} x PP={par.pipeline_parallel}: {m.placement()[0]} rank(s)"
                 if m.backend == "megatron" else "")
        return f"{m.num_workers} worker(s){ranks}"

    models = ", ".join(f"{m.name} ({m.backend}, {layout(m)}; {s.describe()})"
                       for m, s in zip(config.models, sources))
    access = f"{len(keys)} tenant key(s)" if keys else "no API keys (open to anyone on loopback)"
    print(f"{args.file}: OK — serves {models} on {config.host}:{config.port}, {access}")
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
    from twinkle.preflight import PreflightError

    try:
        return args.func(args)
    except PreflightError as exc:
        for line in exc.lines:
            print(f"twinkle: {line}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"twinkle: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
