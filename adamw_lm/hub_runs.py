"""Runs and the Hub: what the trainer and the command line do with :mod:`adamw_lm.hub`.

- :func:`start_pushing`: the run's :class:`~adamw_lm.hub.Pusher` from its ``hub:`` section, with
  the token and write access checked before training starts.
- :func:`finish_pushing`: at the end of a run (or after the final save on Ctrl-C / SIGTERM), wait
  for pending pushes; a second Ctrl-C leaves them and says how to push them later.
- :func:`fetch_run`: ``hub:USER/REPO[@REV]`` -> one verified step folder copied into a local run
  folder, which :func:`adamw_lm.resuming.resume` then continues.
- :func:`push_run`: push an existing run folder after the fact (``adamw-lm push``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from . import checkpoint
from .checkpoint.format import STEP_DIR, step_dirs
from .config import TrainConfig
from .hub import HubError, HubSpec, Pusher, parse_spec, pull


def start_pushing(config: TrainConfig) -> Optional[Pusher]:
    """The run's pusher when ``hub.repo_id`` is set (on rank 0 of a distributed run), prepared.

    Raises:
        HubAuthError: no token, a refused token, or no write access (say ``--repo-id`` on resume).
        HubError: the Hub could not be reached.
    """
    import mlx.core as mx

    hub = config.hub
    if hub.repo_id is None or mx.distributed.init().rank() != 0:
        return None
    keep = hub.keep_remote if hub.keep_remote is not None else config.checkpoint.keep_last
    pusher = Pusher(hub.repo_id, private=hub.private, branch=hub.branch, push_every=hub.push_every,
                    keep_remote=keep or None, push_final=hub.push_final)
    url = pusher.prepare()
    print(f"Pushing checkpoints to {url}", flush=True)
    return pusher


def push_command(run_dir: Path, repo_id: str, pending: list[Path]) -> str:
    """The command that pushes ``pending`` later."""
    steps = [int(m.group(1)) for p in pending if (m := STEP_DIR.fullmatch(p.name))]
    one = f" --step {steps[0]}" if len(steps) == 1 else ""
    return f"adamw-lm push {run_dir} --repo-id {repo_id}{one}"


def finish_pushing(pusher: Optional[Pusher], run_dir: Path, progress: bool = True) -> list[Path]:
    """Wait for the pending pushes (a tqdm bar) and print the repo url; return what is not pushed.

    A Ctrl-C while waiting leaves the pending pushes; what is not pushed is printed with the
    command that pushes it later. Those folders stay in the run folder (rotation spared them).
    """
    if pusher is None:
        return []
    try:
        left = pusher.wait(progress=progress)
    except KeyboardInterrupt:
        left = pusher.close()
    if left:
        names = ", ".join(p.name for p in left)
        print(f"Not on the Hub: {names} (kept in {run_dir / checkpoint.CHECKPOINTS_DIR}); push "
              f"later with: {push_command(run_dir, pusher.repo_id, left)}", file=sys.stderr)
    else:
        print(f"Pushed to {pusher.url}", flush=True)
    return left


def default_run_dir(spec: HubSpec) -> Path:
    """``runs/<repo name>``: where a run resumed from the Hub continues by default."""
    return Path("runs") / spec.repo_id.split("/", 1)[1]


def fetch_run(source: str, step: Optional[int] = None,
              run_dir: Optional[str | Path] = None) -> tuple[Path, int, HubSpec, dict]:
    """Download one checkpoint of the Hub run ``source`` (``hub:USER/REPO[@REV]``; default step:
    the remote latest), verify it, and copy it into ``run_dir`` (default ``runs/<repo name>``).

    Returns the run folder, the step, the parsed spec and the checkpoint's (verified) trainer state.

    Raises:
        HubError: the repo, revision or step does not exist or cannot be read.
        CheckpointError: the downloaded folder does not verify (a file differs from its manifest).
        ConfigError: ``run_dir`` holds checkpoints of another run.
    """
    from .config import ConfigError
    from .runlock import RunLock

    spec = parse_spec(source)
    folder = pull(spec, step)
    try:
        with checkpoint.open_verified(folder) as found:
            manifest, trainer_state = found.manifest, found.trainer_state
    except checkpoint.CheckpointError as e:
        raise HubError(f"Hub repo {spec}: {folder.name} does not verify: {e}") from None
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(spec)
    with RunLock(run_dir):
        _check_same_run(run_dir, spec, ConfigError)
        checkpoint.import_folder(run_dir, folder, [*manifest["files"], checkpoint.MANIFEST])
    return run_dir, manifest["step"], spec, trainer_state


def _check_same_run(run_dir: Path, spec: HubSpec, error: type[Exception]) -> None:
    """A run folder that already holds checkpoints may only be one of this Hub run."""
    existing = checkpoint.open_latest(run_dir)
    if existing is None:
        return
    with existing as found:
        saved = found.trainer_state.get("config")
    hub = saved.get("hub") if isinstance(saved, dict) else None
    if not isinstance(hub, dict) or hub.get("repo_id") != spec.repo_id:
        raise error(f"{run_dir} already holds checkpoints of another run (not pushed to "
                    f"{spec.repo_id}): resume into a new folder with --run-dir DIR")


def push_run(run_dir: str | Path, repo_id: str, *, step: Optional[int] = None, branch: str = "main",
             private: bool = True, progress: bool = True) -> list[Path]:
    """Push the checkpoints of an existing run folder (all, or the one of ``step``), oldest first;
    return what is not pushed. Nothing is deleted on the Hub."""
    run_dir = Path(run_dir)
    root = run_dir / checkpoint.CHECKPOINTS_DIR
    found = sorted(step_dirs(root)) if root.is_dir() else []
    if step is not None:
        found = [(s, f) for s, f in found if s == step]
    if not found:
        have = ", ".join(str(s) for s, _ in sorted(step_dirs(root))) if root.is_dir() else ""
        what = f"no checkpoint at step {step}" if step is not None else "no checkpoints"
        raise checkpoint.NoCheckpointError(f"{run_dir}: {what} to push" + (f" (checkpoints: {have})" if have else ""))
    for _, folder in found:
        checkpoint.verify(folder)  # only checkpoints that load back go to the Hub
    pusher = Pusher(repo_id, private=private, branch=branch)
    print(f"Pushing {len(found)} checkpoint(s) to {pusher.prepare()}", flush=True)
    for _, folder in found:
        pusher.submit(folder)
    return finish_pushing(pusher, run_dir, progress)


__all__ = ["default_run_dir", "fetch_run", "finish_pushing", "push_run", "start_pushing"]
