"""``cut_study.py --jobs``: arms trained side by side (each its own sim), failures kept apart, finished runs reused."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cut_study

from collafuse.deploy.sim import SimSettings


def _arms(tmp_path: Path) -> list[SimSettings]:
    mode = cut_study.STUDY
    return [cut_study.arm_settings(mode, "scarce", key, 0, tmp_path) for key in ("0", "200", "1000", cut_study.GM_MATCHED)]


class FakeRuns:
    """Stands in for ``sim.run``: records which arms ran, how many at once, and fails the arms it is told to."""

    def __init__(self, failing: set[Path]) -> None:
        self.failing = failing
        self.started: list[Path] = []
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, settings: SimSettings) -> dict[str, object]:
        with self.lock:
            self.started.append(settings.out)
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.2)
        with self.lock:
            self.running -= 1
        if settings.out in self.failing:
            raise RuntimeError(f"the server of {settings.out} exited with code 1")
        return {}


@pytest.mark.parametrize("jobs", [1, 2])
def test_arms_run_jobs_at_once_longest_first_and_a_failure_loses_no_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int) -> None:
    arms = _arms(tmp_path)
    runs = FakeRuns(failing={arms[1].out})
    monkeypatch.setattr(cut_study, "run", runs)
    monkeypatch.setattr(cut_study, "finished", lambda settings: False)
    failed = cut_study.train_arms(arms, jobs, resume=True, reuse_only=False)
    assert failed == [str(arms[1].out)]
    assert sorted(runs.started) == sorted(a.out for a in arms)  # every arm ran, the failing one too
    assert runs.most == jobs
    assert runs.started[0] == arms[3].out  # GM at matched compute: 11 x the steps on one model


def test_finished_arms_are_reused_and_reuse_only_trains_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arms = _arms(tmp_path)
    runs = FakeRuns(failing=set())
    monkeypatch.setattr(cut_study, "run", runs)
    monkeypatch.setattr(cut_study, "finished", lambda settings: settings.out == arms[0].out)
    assert cut_study.train_arms(arms, 2, resume=True, reuse_only=False) == []
    assert sorted(runs.started) == sorted(a.out for a in arms[1:])
    runs.started.clear()
    assert cut_study.train_arms(arms, 2, resume=True, reuse_only=True) == []
    assert runs.started == []
    assert cut_study.train_arms(arms, 2, resume=False, reuse_only=False) == []  # --no-resume runs them all again
    assert sorted(runs.started) == sorted(a.out for a in arms)


def test_jobs_below_one_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cut_study.main(["--study", "--jobs", "0"])
    assert exit_info.value.code == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err
