"""``adamw-lm``: a thin command line over the library.

    adamw-lm train [CONFIG.yaml] [options]      # every `mlx_lm lora` option, in any order, plus
                                                # --section.key value for our sections
    adamw-lm resume RUN_DIR [--iters N] [--step N] [--convert-precision]
    adamw-lm resume hub:USER/REPO[@REVISION] [--step N] [--run-dir DIR] [--repo-id USER/REPO]
    adamw-lm push RUN_DIR --repo-id USER/REPO [--step N] [--branch NAME] [--public]
    adamw-lm plan --model PATH_OR_CONFIG --fine-tune-type lora|dora|full [--all-parameters]
                  [--batch-size N --max-seq-length N --grad-checkpoint --memory GB]
    adamw-lm inspect CHECKPOINT_OR_RUN_DIR | hub:USER/REPO[@REVISION]
    adamw-lm tiny-model OUT_DIR [--size small|medium] [--seed N]

Bad input exits with status 2 and one line that names what is wrong; a run stopped by Ctrl-C or
SIGTERM saves a checkpoint, prints the resume command and exits with 130 (SIGINT) or 143 (SIGTERM).
``push`` exits with 1 when a checkpoint is still not on the Hub after its retries (it says which).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

RUN_COMMANDS = ("train", "resume")

#: Our own options of ``train`` / ``resume``: option -> the type of its value (``None``: a switch).
_OWN_OPTIONS: dict[str, dict[str, Optional[type]]] = {
    "train": {"--overwrite": None, "--no-progress": None},
    "resume": {"--no-progress": None, "--convert-precision": None, "--step": int, "--run-dir": str,
               "--repo-id": str, "--accept-changed-model": None, "--accept-changed-data": None},
}

#: On resume these are the user's word again for what a saved config cannot grant by itself
#: (the trainer ignores their saved values); there they are switches, as --trust-remote-code is.
_RESUME_SWITCHES = {"--hf-dataset": "hf_dataset"}


@dataclasses.dataclass
class RunArgs:
    """A ``train`` / ``resume`` command line, sorted out."""

    command: str
    path: Optional[str] = None  # train: the config file; resume: the run folder
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    overwrite: bool = False
    no_progress: bool = False
    convert_precision: bool = False
    step: Optional[int] = None
    run_dir: Optional[str] = None  # resume hub:...: the local run folder
    repo_id: Optional[str] = None  # resume hub:...: push to this repo instead
    accept_changed_model: bool = False
    accept_changed_data: bool = False


def _mlx_lm_parser() -> argparse.ArgumentParser:
    from mlx_lm.lora import build_parser

    parser = build_parser()
    parser.exit_on_error = False  # a bad value raises ArgumentError, which we turn into one line
    return parser


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    # argparse has no public listing of its actions; `_actions` is the long-standing way to read them.
    return {s: a for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}


def _config_keys() -> list[str]:
    from .config import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig)] + ["optimizer_config"]


def _unknown(option: str, command: str, mlx_options: dict[str, argparse.Action]) -> str:
    from .config import RENAMED_KEYS

    renamed = RENAMED_KEYS.get(option[2:].replace("-", "_"))
    if renamed:
        return f"unknown option {option}; mlx-lm renamed it to --{renamed.replace('_', '-')}"
    known = [*mlx_options, *_OWN_OPTIONS[command], *("--" + k.replace("_", "-") for k in _config_keys())]
    if command == "resume":
        known += list(_RESUME_SWITCHES)
    close = difflib.get_close_matches(option, [k for k in known if k.startswith("--")], n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f" (see adamw-lm {command} --help)"
    return f"unknown option {option}{hint}"


class _Line:
    """A cursor over the tokens of a command line."""

    def __init__(self, tokens: Sequence[str]):
        self.tokens, self.i = list(tokens), 0

    def __bool__(self) -> bool:
        return self.i < len(self.tokens)

    def take(self) -> str:
        self.i += 1
        return self.tokens[self.i - 1]

    def value_follows(self) -> bool:
        return bool(self) and not self.tokens[self.i].startswith("--")

    def value(self, option: str, inline: Optional[str]) -> str:
        """``--option=value`` or ``--option value`` (which may be negative: ``--num-layers -1``)."""
        from .config import ConfigError

        if inline is not None:
            return inline
        if not self.value_follows():
            raise ConfigError(f"option {option} expects a value")
        return self.take()


def _switch(option: str, inline: Optional[str]) -> bool:
    from .config import ConfigError, parse_override

    flag = True if inline is None else parse_override(inline)
    if not isinstance(flag, bool):
        raise ConfigError(
            f"option {option} is a switch: give it alone, or {option}=true / false; got {inline!r}")
    return flag


def parse_run_args(command: str, tokens: Sequence[str]) -> RunArgs:
    """Sort a ``train`` / ``resume`` command line into a path, config overrides and our own flags.

    mlx-lm's own parser (``mlx_lm.lora.build_parser``) says which of its options take a value and
    converts that value; ``--key value`` / ``--key=value`` also set any config key, dotted for a
    section (``--optimizer.state_precision int8``). Options and the path may come in any order.
    """
    from .config import ConfigError, parse_override

    mlx_parser = _mlx_lm_parser()
    mlx_options = _options(mlx_parser)
    own = _OWN_OPTIONS[command]
    args = RunArgs(command)
    positionals: list[str] = []
    config_option: Optional[str] = None
    line = _Line(tokens)
    while line:
        token = line.take()
        if not token.startswith("-") or token == "-":
            positionals.append(token)
            continue
        if token.startswith("--"):
            option, has_inline, text = token.partition("=")
            inline = text if has_inline else None
            if "." not in option:
                option = "--" + option[2:].replace("_", "-")  # --batch_size is --batch-size
        else:  # a short option: -c CONFIG, -cCONFIG, -c=CONFIG
            option, inline = token[:2], token[2:].removeprefix("=") or None

        other = next((c for c in RUN_COMMANDS if c != command and option in _OWN_OPTIONS[c]), None)
        if option in own:
            dest = option[2:].replace("-", "_")
            if own[option] is None:
                setattr(args, dest, _switch(option, inline))
                continue
            text = line.value(option, inline)
            try:
                setattr(args, dest, own[option](text))
            except ValueError:
                raise ConfigError(f"option {option} expects an int, got {text!r}") from None
        elif other is not None and option not in mlx_options:
            raise ConfigError(f"option {option} belongs to `adamw-lm {other}`, not `{command}`")
        elif command == "resume" and option in _RESUME_SWITCHES:
            args.overrides[_RESUME_SWITCHES[option]] = _switch(option, inline)
        elif option in mlx_options:
            action = mlx_options[option]
            if action.nargs == 0:
                args.overrides[action.dest] = _switch(option, inline)
                continue
            text = line.value(option, inline)
            if action.dest != "config":
                try:  # mlx-lm's own conversion and checks (int, float, sizes such as 2GB, choices)
                    parsed = mlx_parser.parse_args([f"{action.option_strings[-1]}={text}"])
                except argparse.ArgumentError as e:
                    raise ConfigError(str(e)) from None
                except (ValueError, KeyError, ArithmeticError):  # raised by a type mlx-lm wrote
                    raise ConfigError(f"argument {option}: invalid value {text!r}") from None
                args.overrides[action.dest] = getattr(parsed, action.dest)
            elif command == "resume":
                raise ConfigError("resume reads the config saved in the run's checkpoint: "
                                  "give the run folder, and --key value to change what may change")
            elif config_option is not None:
                raise ConfigError(f"two config files given: --config {config_option} and --config {text}")
            else:
                config_option = text
        elif option.startswith("--") and option[2:].split(".")[0].replace("-", "_") in _config_keys():
            key = option[2:].replace("-", "_")
            if inline is None and not line.value_follows():
                args.overrides[key] = True  # a bare key is a switch, as `--grad-checkpoint` is
            else:
                args.overrides[key] = parse_override(line.value(option, inline))
        else:
            raise ConfigError(_unknown(option, command, mlx_options))

    what = "a config file" if command == "train" else "the run folder"
    if len(positionals) > 1:
        raise ConfigError(f"unexpected argument {positionals[1]!r}: {command} takes one path ({what}), "
                          f"and options as --key value")
    args.path = positionals[0] if positionals else None
    if command == "train" and config_option is not None:
        if args.path is not None:
            raise ConfigError(f"two config files given: {args.path} and --config {config_option}")
        args.path = config_option
    if command == "resume" and args.path is None:
        raise ConfigError("resume needs the run folder: adamw-lm resume RUN_DIR [--key value ...] "
                          "or adamw-lm resume hub:USER/REPO[@REVISION]")
    hub_only = [o for o, v in (("--run-dir", args.run_dir), ("--repo-id", args.repo_id)) if v is not None]
    if hub_only and not (args.path or "").startswith("hub:"):
        raise ConfigError(f"option {hub_only[0]} is for a run resumed from the Hub (hub:USER/REPO); "
                          f"a local run continues in its own folder")
    return args


def _exit_code(result: Any) -> int:
    if result.stop_signal is not None:
        return 128 + result.stop_signal  # the shell's convention for a signal: 130 SIGINT, 143 SIGTERM
    from .distributed import is_main

    if is_main():
        print(result.summary())
    return 0


def _run(args: RunArgs) -> int:
    from . import resuming, trainer
    from .config import load_config

    if args.command == "train":
        config = load_config(args.path, args.overrides)
        return _exit_code(trainer.run(config, overwrite=args.overwrite, progress=not args.no_progress))
    options = {"convert_precision": args.convert_precision, "overrides": args.overrides,
               "progress": not args.no_progress, "step": args.step,
               "accept_changed": frozenset(k for k in ("model", "data")
                                           if getattr(args, f"accept_changed_{k}"))}
    if args.path.startswith("hub:"):
        return _exit_code(resuming.resume_from_hub(args.path, run_dir=args.run_dir,
                                                   repo_id=args.repo_id, **options))
    return _exit_code(resuming.resume(args.path, **options))


def plan_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`adamw_lm.memory.plan_from_config` for ``adamw-lm plan``."""
    from .config import ConfigError

    if args.all_parameters and args.fine_tune_type != "full":
        raise ConfigError("--all-parameters counts a full fine-tune of every parameter: "
                          "give it with --fine-tune-type full")
    if args.all_parameters and args.num_layers is not None:
        raise ConfigError("--all-parameters trains every parameter; --num-layers picks blocks: give one")
    num_layers = None if args.all_parameters else args.num_layers
    if num_layers is None and not args.all_parameters:
        num_layers = 16  # mlx_lm lora's default, for full as for lora: what `train` trains
    for name in ("batch_size", "max_seq_length"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    if getattr(args, "memory", None) is not None and not args.memory > 0:
        raise ConfigError(f"--memory must be a Mac's RAM in GB (> 0); got {args.memory}")
    batch_size = getattr(args, "batch_size", None)
    world_size = getattr(args, "world_size", 1)
    if batch_size is not None and world_size > 1:
        if batch_size % world_size:
            raise ConfigError(f"--batch-size {batch_size} does not split over --world-size {world_size} "
                              "processes (each takes an equal share of every batch)")
        batch_size //= world_size  # the activations of one process's share
    return {"fine_tune_type": args.fine_tune_type, "rank": args.rank, "num_layers": num_layers,
            "weight_update": args.weight_update, "batch_size": batch_size,
            "max_seq_length": getattr(args, "max_seq_length", 2048),
            "grad_checkpoint": getattr(args, "grad_checkpoint", False)}


def _cmd_plan(args: argparse.Namespace) -> int:
    from . import memory
    from .config import ConfigError
    from .sharding import per_process_plan

    precisions = memory.DEFAULT_PRECISIONS
    if args.precision:
        precisions = tuple(None if p.lower() == "none" else p for p in args.precision)
    try:
        plan = memory.plan_from_config(args.model, precisions=precisions, **plan_options(args))
        plan = per_process_plan(plan, args.world_size, args.shard_state)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(plan.to_markdown(memory_gb=args.memory))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from . import checkpoint

    if args.path.startswith("hub:"):
        print(_remote_table(args.path))
        return 0
    print(checkpoint.describe(args.path))
    return 0


def _remote_table(source: str) -> str:
    """``adamw-lm inspect hub:...``: the remote checkpoints, newest first, as a markdown table."""
    from .hub import list_remote

    def fmt(x: Optional[float]) -> str:
        return "-" if x is None else f"{x:.4f}"

    rows = [f"Checkpoints of {source}:", "", "| step | train loss | val loss | size | |",
            "|---:|---:|---:|---:|---|"]
    for c in list_remote(source):
        rows.append(f"| {c.step} | {fmt(c.train_loss)} | {fmt(c.val_loss)} | {c.size / 1e6:.1f} MB | "
                    f"{'latest' if c.latest else ''} |")
    return "\n".join(rows)


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub_runs import push_run

    left = push_run(args.run_dir, args.repo_id, step=args.step, branch=args.branch,
                    private=not args.public)
    return 1 if left else 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from .tiny import build_tiny_model

    path = build_tiny_model(args.out_dir, size=args.size, seed=args.seed)
    print(f"Tiny {args.size} model written to {path}")
    return 0


_RUN_EPILOG = (
    "Every option of `mlx_lm lora` (see `mlx_lm.lora --help`) is accepted, in any order, as are "
    "--key value / --key=value for any config key and --section.key value for a key of a "
    "section (--optimizer.state_precision int8, --checkpoint.keep_last 2, --lora-parameters.rank 16)."
)


def build_parser() -> argparse.ArgumentParser:
    """The ``adamw-lm`` parser: subcommands, and the help of ``train`` / ``resume``.

    ``train`` and ``resume`` lines are read by :func:`parse_run_args`, which knows mlx-lm's options.
    """
    parser = argparse.ArgumentParser(prog="adamw-lm", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune from a YAML config and/or mlx_lm lora options",
                       allow_abbrev=False, epilog=_RUN_EPILOG)
    p.add_argument("config", nargs="?", help="YAML config (mlx_lm lora keys); options override its keys")
    p.add_argument("-c", "--config", dest="config_option", metavar="CONFIG",
                   help="the YAML config, as `mlx_lm lora --config` takes it")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that already holds checkpoints (deletes them)")
    p.add_argument("--no-progress", action="store_true", help="report lines without a progress bar")

    p = sub.add_parser("resume", help="continue a run exactly where it stopped", allow_abbrev=False,
                       epilog=_RUN_EPILOG + " Only what keeps it the same run may change "
                       "(--iters, intervals, locations).")
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, help="resume from the checkpoint of this iteration, not the latest")
    p.add_argument("--run-dir", help="hub:...: the local run folder (default runs/<repo name>)")
    p.add_argument("--repo-id", help="hub:...: push to this repo (when you cannot write to the source)")
    p.add_argument("--accept-changed-model", action="store_true",
                   help="continue although the model differs from the run's (marks the run not exact)")
    p.add_argument("--accept-changed-data", action="store_true",
                   help="continue although the data differs from the run's (marks the run not exact)")
    p.add_argument("--convert-precision", action="store_true",
                   help="allow resuming with another optimizer.state_precision or optimizer.weight_update "
                        "(converts the moments, and the weights' buffer)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="needed again on resume: a saved config cannot grant it")
    p.add_argument("--report-to", help="needed again on resume (wandb, swanlab)")
    p.add_argument("--hf-dataset", action="store_true",
                   help="needed again on resume to load the saved hf_dataset")
    p.add_argument("--no-progress", action="store_true", help="report lines without a progress bar")

    p = sub.add_parser("plan", help="memory table for a model, from its config.json alone",
                       allow_abbrev=False)
    p.add_argument("--model", required=True, help="model folder or its config.json")
    p.add_argument("--fine-tune-type", choices=["lora", "dora", "full"], default="lora")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--num-layers", type=int, default=None,
                   help="the last N blocks are trained, as mlx_lm lora (default 16, -1: all); with "
                        "full, embeddings and head stay frozen, as in `train`")
    p.add_argument("--all-parameters", action="store_true",
                   help="with --fine-tune-type full: every parameter, embeddings and head included")
    p.add_argument("--precision", nargs="+", default=None,
                   help="state precisions to show: none fp32 bf16 int8 int4 (default: all)")
    p.add_argument("--world-size", type=int, default=1,
                   help="memory per process of a data-parallel run of this many processes (mlx.launch)")
    p.add_argument("--shard-state", action="store_true",
                   help="with --world-size: optimizer state sharded over the processes (optimizer.shard_state)")
    p.add_argument("--weight-update", choices=["nearest", "stochastic", "exact"], default=None,
                   help="AdamW's weight_update for bf16/fp16 weights ('exact' adds 2 bytes per "
                        "parameter of state; default: AdamW's)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="sequences per step, as mlx_lm lora (default 4): counts activations")
    p.add_argument("--max-seq-length", type=int, default=2048,
                   help="tokens per sequence, as mlx_lm lora (default 2048)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="gradient checkpointing, as mlx_lm lora: keeps each block's input only")
    p.add_argument("--memory", type=float, default=None, metavar="GB",
                   help="a Mac's RAM: say which rows fit Metal's default working-set limit "
                        "(about 75 %% of it; sysctl iogpu.wired_limit_mb raises it)")
    p.set_defaults(fn=_cmd_plan)

    p = sub.add_parser("inspect", help="what a checkpoint holds, and whether it verifies")
    p.add_argument("path", help="a checkpoint folder, a run folder (its latest checkpoint), or "
                                "hub:USER/REPO[@REVISION] (its checkpoints with their losses)")
    p.set_defaults(fn=_cmd_inspect)

    p = sub.add_parser("push", help="push an existing run's checkpoints to the Hugging Face Hub")
    p.add_argument("run_dir")
    p.add_argument("--repo-id", required=True, help="USER/REPO (created private if missing)")
    p.add_argument("--step", type=int, help="push only the checkpoint of this iteration")
    p.add_argument("--branch", default="main")
    p.add_argument("--public", action="store_true", help="create the repo public (default private)")
    p.set_defaults(fn=_cmd_push)

    p = sub.add_parser("tiny-model", help="build the offline tiny Llama model (deterministic)")
    p.add_argument("out_dir")
    p.add_argument("--size", choices=["small", "medium"], default="small")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_tiny_model)
    return parser


class _OneLine(logging.Handler):
    """``adamw-lm: warning: ...`` on stderr (looked up at each message, so redirection holds)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"adamw-lm: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def configure_messages() -> None:
    """Warnings of the ``adamw_lm`` logger, and ``warnings.warn`` from our own code, as one line each."""
    logger = logging.getLogger("adamw_lm")
    if any(isinstance(h, _OneLine) for h in logger.handlers):
        return
    logger.addHandler(_OneLine())
    logger.setLevel(logging.WARNING)
    package = Path(__file__).resolve().parent
    show = warnings.showwarning

    def show_ours(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: Optional[str] = None) -> None:
        if Path(filename).resolve().is_relative_to(package):
            logger.warning("%s", message)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = show_ours


#: Characters of an error message printed; the rest is counted.
MAX_MESSAGE_CHARS = 2000


def _printable(error: BaseException) -> str:
    """``error``'s message for the terminal. Messages quote configs, paths and names that may come
    from a stranger's checkpoint: control characters (escape sequences, a line break that would
    forge a line of output) are shown escaped, and a long message is cut. Line breaks stay in the
    messages that list several problems on purpose, which are not config errors."""
    from .config import ConfigError

    text = str(error)
    if len(text) > MAX_MESSAGE_CHARS:
        text = f"{text[:MAX_MESSAGE_CHARS]}... ({len(text)} characters in all)"
    keep = "" if isinstance(error, ConfigError) else "\n"
    return "".join(c if c.isprintable() or c in keep else ascii(c)[1:-1] for c in text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``adamw-lm`` console script."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .distributed import PeerLostError

    argv = list(sys.argv[1:] if argv is None else argv)
    configure_messages()
    command = argv[0] if argv else None
    try:
        if command in RUN_COMMANDS and not {"-h", "--help"} & set(argv[1:]):
            code = _run(parse_run_args(command, argv[1:]))
        else:
            args = build_parser().parse_args(argv)  # plan / inspect / tiny-model, and every --help
            command = args.command
            code = args.fn(args)
    except BrokenPipeError:  # `adamw-lm inspect RUN | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 128 + signal.SIGPIPE
    except (ConfigError, CheckpointError, OSError) as e:
        print(f"adamw-lm {command}: error: {_printable(e)}", file=sys.stderr)
        return 2
    except PeerLostError as e:
        print(f"adamw-lm {command}: error: {_printable(e)}; the run stops here (resume from its last "
              "complete checkpoint)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("adamw-lm: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return code


if __name__ == "__main__":
    sys.exit(main())
