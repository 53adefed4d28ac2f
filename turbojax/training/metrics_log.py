"""`metrics.jsonl`: one JSON object per logged step, consistent with the checkpoint a run resumes from.

    class MetricsLog(path, resume_step: int)
        On open, lines with `step > resume_step` (written after the checkpoint the run resumes from: they will be
        written again) and a torn last line of a killed run are dropped, by an atomic rewrite of the file; nothing is
        rewritten when nothing is dropped. Lines that are not ours (no integer "step") are kept.
        write(step, metrics)   append `{**metrics, "step": step}` as one line (one write call, flushed); returns
                               the line
        close()                also a context manager
        steps() -> list[int]   the steps currently in the file (for tests and tools)

So a run killed after logging step 25 whose last checkpoint is step 20 leaves, after its resume, exactly one line per
logged step.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from turbojax.convert.atomic import commit_file


def _step_of(line: str) -> int | None | bool:
    """The line's step; None for a line that is not one of ours; False for a torn/unreadable line."""
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    step = obj.get("step") if isinstance(obj, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class MetricsLog:
    def __init__(self, path: str | Path, resume_step: int = 0):
        self.path = Path(path)
        if self.path.is_file():
            text = self.path.read_text()
            lines = text.splitlines(keepends=True)
            keep = []
            for i, line in enumerate(lines):
                step = _step_of(line)
                torn = step is False and i == len(lines) - 1  # a kill mid-append; other bad lines are not ours
                if torn or (step not in (None, False) and step > resume_step):
                    continue
                keep.append(line if line.endswith("\n") else line + "\n")
            if "".join(keep) != text:
                data = "".join(keep).encode()
                commit_file(self.path, lambda f: f.write(data))
        self._f = open(self.path, "a")

    def write(self, step: int, metrics: Mapping[str, float]) -> str:
        line = json.dumps({**{k: float(v) for k, v in metrics.items()}, "step": int(step)}) + "\n"
        self._f.write(line)  # one write of one line: a kill leaves at most a torn last line, dropped on reopen
        self._f.flush()
        return line

    def steps(self) -> list[int]:
        self._f.flush()
        return [s for line in self.path.read_text().splitlines() if isinstance(s := _step_of(line), int)
                and s is not False]

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
