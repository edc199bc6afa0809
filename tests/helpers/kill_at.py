"""Run the adamw-lm CLI and SIGKILL it at one chosen moment (tests/test_kill_points.py).

    python kill_at.py MODE ARG -- CLI ARGS...

Modes:
    after-save N         just after the checkpoint of iteration N is committed (``latest`` names it)
    between-renames N    while a save replaces the folder of step N: the old one moved aside, the
                         new one not yet in its place
    before-replace NAME  a run folder's file NAME written to its temporary, not yet renamed over it
    at-iteration N       as iteration N starts (its step not taken)
    before-rmtree NAME   as the run removes its folder NAME (an --overwrite removing checkpoints)
"""

import os
import signal
import sys
import types
from pathlib import Path


def die() -> None:
    print("killed", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def patched_os(**replaced) -> types.SimpleNamespace:
    """The ``os`` module as one module sees it, with some functions replaced."""
    return types.SimpleNamespace(**{**vars(os), **replaced})


def arm(mode: str, arg: str) -> None:
    if mode == "after-save":
        from adamw_lm import checkpoint

        save = checkpoint.save

        def save_then_die(run_dir, step, *args, **kwargs):
            path = save(run_dir, step, *args, **kwargs)
            if step == int(arg):
                die()
            return path

        checkpoint.save = save_then_die  # the trainer calls it through the package
    elif mode == "between-renames":
        from adamw_lm.checkpoint import writing

        name = f"step-{int(arg):07d}"

        def rename(src, dst):
            if Path(dst).name == name and Path(src).name.startswith(".tmp-"):
                die()
            return os.rename(src, dst)

        writing.os = patched_os(rename=rename)
    elif mode == "before-replace":
        from adamw_lm import runfiles

        def replace(src, dst):
            if Path(dst).name == arg:
                die()
            return os.replace(src, dst)

        runfiles.os = patched_os(replace=replace)
    elif mode == "at-iteration":
        from adamw_lm import trainer

        seed_of = trainer.iteration_seed

        def seed_or_die(seed, it):
            if it == int(arg):
                die()
            return seed_of(seed, it)

        trainer.iteration_seed = seed_or_die
    elif mode == "before-rmtree":
        import shutil

        from adamw_lm import trainer

        def rmtree(path, *args, **kwargs):
            if Path(path).name == arg:
                die()
            return shutil.rmtree(path, *args, **kwargs)

        trainer.shutil = types.SimpleNamespace(**{**vars(shutil), "rmtree": rmtree})
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    mode, arg, separator, *cli = sys.argv[1:]
    assert separator == "--", sys.argv
    arm(mode, arg)
    from adamw_lm.cli import main

    sys.exit(main(cli))
