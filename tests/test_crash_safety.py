"""A process killed (SIGKILL) at any moment of a checkpoint save never leaves a lying checkpoint.

tests/helpers/save_forever.py saves a 201 MB checkpoint (weights + float32 moments) in a loop.
Each round starts it, lets one save complete (the first save after the previous kill must
succeed), and kills it at a chosen fraction of the next save's measured duration. Then
``load_latest`` must return a verified checkpoint that is exactly the one ``latest`` names: the
previous step, or the new one when the kill came after ``latest`` was replaced.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx

from adamw_lm import checkpoint

HELPER = Path(__file__).parent / "helpers" / "save_forever.py"
KILLS = 20
# Kill moments as fractions of one save's duration; the last few land after the folder rename.
FRACTIONS = [1.1 * (i + 0.5) / KILLS for i in range(KILLS)]

_spec = importlib.util.spec_from_file_location("save_forever", HELPER)
save_forever = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(save_forever)


class Saver:
    """The helper process, with its stdout lines timestamped as they arrive."""

    def __init__(self, run_dir: Path, first_step: int):
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPER), str(run_dir), str(first_step)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue = queue.Queue()
        self.printed: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.printed.append(line.strip())
            self.lines.put((time.perf_counter(), line.strip()))
        self.lines.put((time.perf_counter(), None))

    def expect(self, text: str) -> float:
        """Wait for the line ``text``; return when it arrived."""
        arrived, line = self.lines.get(timeout=120)
        if line != text:
            self.kill()
            raise AssertionError(
                f"helper printed {line!r}, expected {text!r}:\n{self.proc.stderr.read()}"
            )
        return arrived

    def kill(self) -> tuple[int, int]:
        """Kill it; return the last step it started and the last one it reported done."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join()
        self.proc.stdout.close()
        self.proc.stderr.close()
        last = {word: int(n) for word, n in (line.split() for line in self.printed)}
        return last["start"], last["done"]


def check_after_kill(run_dir: Path, saver: Saver, model, optimizer, caplog) -> tuple[int, str]:
    """Assert the run resumes from a complete checkpoint; say where in the save the kill landed."""
    started, done = saver.kill()
    root = run_dir / "checkpoints"
    named = (root / "latest").read_text().strip()
    caplog.clear()
    path, state = checkpoint.load_latest(run_dir, model, optimizer)
    # latest must name a complete checkpoint: no fallback (which would log a warning) was needed.
    assert [r for r in caplog.records if r.name == "adamw_lm.checkpoint"] == []
    step = state["step"]
    # Never older than a save that returned, never newer than one that began.
    assert path.name == named and done <= step <= started, (path, named, done, started)
    # The content is that step's, bit for bit.
    assert mx.all(model.weight == step).item()
    assert mx.all(optimizer.state["weight"]["m"] == step + 0.25).item()
    assert mx.all(optimizer.state["weight"]["v"] == step + 0.5).item()
    assert optimizer.state["step"].item() == step
    if step == started:
        where = "after latest was replaced"
    elif (root / f"step-{started:07d}").exists():
        where = "after the folder rename"
    elif list(root.glob(f".tmp-step-{started:07d}-*-{saver.proc.pid}")):
        where = "while writing the temporary folder"
    else:
        where = "before the temporary folder existed"
    return started, where


def test_sigkill_at_any_moment_of_a_save_keeps_the_previous_checkpoint(tmp_path, caplog):
    # tmpfs when there is one: 20 rounds write ~8 GB, and fsync plays no part against SIGKILL.
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        run_dir = Path(tmp) / "run"
        saver = Saver(run_dir, 1)
        durations = []
        for step in range(1, 4):
            started = saver.expect(f"start {step}")
            durations.append(saver.expect(f"done {step}") - started)
        save_time = statistics.median(durations[1:])  # the first save pays for imports
        model, optimizer = save_forever.make()
        last, _ = check_after_kill(run_dir, saver, model, optimizer, caplog)

        outcomes: Counter = Counter()
        for fraction in FRACTIONS:
            next_step = last + 1
            saver = Saver(run_dir, next_step)
            saver.expect(f"start {next_step}")
            saver.expect(f"done {next_step}")  # the save after a kill succeeds
            # The kill's moment from this process's second save, the one just before it: other
            # tests running beside this one (pytest-xdist) change how long a save takes, and a
            # process's first save is the slow one.
            began = saver.expect(f"start {next_step + 1}")
            save_time = saver.expect(f"done {next_step + 1}") - began
            started = saver.expect(f"start {next_step + 2}")
            time.sleep(max(0.0, started + fraction * save_time - time.perf_counter()))
            last, where = check_after_kill(run_dir, saver, model, optimizer, caplog)
            outcomes[where] += 1

        # The kills really landed inside the write, most of them (where exactly depends on timing).
        assert outcomes["while writing the temporary folder"] >= KILLS // 2, outcomes
        print(f"save of 201 MB: {save_time:.3f} s; kills landed: {dict(outcomes)}")

        # The next save after the last kill succeeds and removes what the killed saves left behind.
        save_forever.fill(model, optimizer, last + 1)
        path = checkpoint.save(run_dir, last + 1, model, optimizer, {"step": last + 1}, {},
                               keep_last=2)
        assert checkpoint.latest_checkpoint(run_dir) == path
        leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
        assert leftovers == []
