"""``adamw-lm``: a thin command line over the library.

    adamw-lm train CONFIG.yaml [--key value ...]    # keys as in mlx_lm lora's YAML; dotted for sections
    adamw-lm resume RUN_DIR [--convert-precision]
    adamw-lm plan --model PATH_OR_CONFIG --fine-tune-type lora|full [--precision ...]
    adamw-lm inspect CHECKPOINT_OR_RUN_DIR
    adamw-lm tiny-model OUT_DIR [--size small|medium] [--seed N]

Bad input exits with status 2 and one line that names what is wrong; a run stopped by Ctrl-C or
SIGTERM saves a checkpoint, prints the resume command and exits with 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, Optional, Sequence


def _parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """``["--iters", "20", "--grad-checkpoint", "--optimizer.state_precision", "int8"]`` → dict."""
    from .config import ConfigError, parse_override

    overrides: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r} (overrides look like --key value)")
        key, _, inline = token[2:].partition("=")
        if inline:
            overrides[key] = parse_override(inline)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            overrides[key] = parse_override(tokens[i + 1])
            i += 2
        else:
            overrides[key] = True
            i += 1
    overrides = {k.replace("-", "_"): v for k, v in overrides.items()}
    if "config" in overrides:
        raise ConfigError("--config names the YAML file: give it once, before any --key value override")
    return overrides


def _exit_code(result: Any) -> int:
    if result.stop_signal is not None:
        return 128 + result.stop_signal  # the shell's convention for a signal: 130 SIGINT, 143 SIGTERM
    print(f"Done: iteration {result.iteration}; checkpoint {result.checkpoint}; "
          f"adapters in {result.run_dir}")
    return 0


def _cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from . import trainer
    from .config import ConfigError, load_config

    if args.config and args.config_option:
        raise ConfigError(f"two config files given: {args.config} and --config {args.config_option}")
    config = load_config(args.config or args.config_option, _parse_overrides(extra))
    return _exit_code(trainer.run(config, overwrite=args.overwrite, progress=not args.no_progress))


def _cmd_resume(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from . import trainer

    result = trainer.resume(
        args.run_dir, convert_precision=args.convert_precision,
        overrides=_parse_overrides(extra), progress=not args.no_progress,
    )
    return _exit_code(result)


def _cmd_plan(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from . import memory
    from .config import ConfigError

    num_layers = args.num_layers
    if num_layers is None and args.fine_tune_type != "full":
        num_layers = 16  # mlx_lm lora's default
    precisions = memory.DEFAULT_PRECISIONS
    if args.precision:
        precisions = tuple(None if p.lower() == "none" else p for p in args.precision)
    try:
        plan = memory.plan_from_config(
            args.model, fine_tune_type=args.fine_tune_type, rank=args.rank,
            num_layers=num_layers, precisions=precisions, weight_update=args.weight_update,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(plan.to_markdown())
    return 0


def _cmd_inspect(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from . import checkpoint

    print(checkpoint.describe(args.path))
    return 0


def _cmd_tiny_model(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from .tiny import build_tiny_model

    path = build_tiny_model(args.out_dir, size=args.size, seed=args.seed)
    print(f"Tiny {args.size} model written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adamw-lm", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune from a YAML config (mlx_lm lora keys)", allow_abbrev=False)
    p.add_argument("config", nargs="?", help="YAML config; --key value pairs override its keys")
    p.add_argument("-c", "--config", dest="config_option", metavar="CONFIG",
                   help="the YAML config, as `mlx_lm lora --config` takes it")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that already holds checkpoints (deletes them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("resume", help="continue a run exactly where it stopped", allow_abbrev=False)
    p.add_argument("run_dir")
    p.add_argument("--convert-precision", action="store_true",
                   help="allow resuming with another optimizer.state_precision (converts the moments)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_resume)

    p = sub.add_parser("plan", help="memory table for a model, from its config.json alone",
                       allow_abbrev=False)
    p.add_argument("--model", required=True, help="model folder or its config.json")
    p.add_argument("--fine-tune-type", choices=["lora", "dora", "full"], default="lora")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--num-layers", type=int, default=None,
                   help="last N blocks trained, as mlx_lm lora (default 16 for lora/dora; "
                        "for full: every parameter, embeddings and head included)")
    p.add_argument("--precision", nargs="+", default=None,
                   help="state precisions to show: none fp32 bf16 int8 int4 (default: all)")
    p.add_argument("--weight-update", choices=["nearest", "stochastic", "exact"], default=None,
                   help="AdamW's weight_update for bf16/fp16 weights ('exact' adds 2 bytes per "
                        "parameter of state; default: AdamW's)")
    p.set_defaults(fn=_cmd_plan)

    p = sub.add_parser("inspect", help="what a checkpoint holds, and whether it verifies")
    p.add_argument("path", help="a checkpoint folder or a run folder (its latest checkpoint)")
    p.set_defaults(fn=_cmd_inspect)

    p = sub.add_parser("tiny-model", help="build the offline tiny Llama model (deterministic)")
    p.add_argument("out_dir")
    p.add_argument("--size", choices=["small", "medium"], default="small")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_tiny_model)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``adamw-lm`` console script."""
    from .checkpoint import CheckpointError
    from .config import ConfigError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "resume"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = args.fn(args, extra)
    except (ConfigError, CheckpointError, OSError) as e:
        print(f"adamw-lm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adamw-lm: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return code


if __name__ == "__main__":
    sys.exit(main())

