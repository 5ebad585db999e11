"""``collafuse-eval``: one JSON object on stdout, exit 2 with one plain line on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from eval_support import make_eval_folders, run_eval


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_eval_folders(tmp_path_factory.mktemp("eval"))


def test_fid_prints_one_json_object_and_caches(folders: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = str(folders / "cache")
    args = ["fid", str(folders / "real"), str(folders / "fake"), "--cache-dir", cache, "--kid-subsets", "10"]
    code, result, _ = run_eval(args, capsys)
    assert code == 0 and result is not None
    assert result["n_real"] == 12 and result["n_fake"] == 8 and result["features"] == "inception"
    assert isinstance(result["fid"], float) and result["fid"] > 0
    assert set(result["kid"]) >= {"mean", "std"}
    assert result["from_cache"] == {"real": False, "fake": False} and "floor" in str(result["note"])
    code, again, _ = run_eval(args, capsys)
    assert code == 0 and again is not None and again["from_cache"] == {"real": True, "fake": True}
    assert again["fid"] == result["fid"]
    code, floor, _ = run_eval(["floor", str(folders / "real"), "--n", "6", "--cache-dir", cache, "--repeats", "2"], capsys)
    assert code == 0 and floor is not None and floor["n"] == 6 and floor["n_real_total"] == 12 and floor["fid"] > 0


@pytest.mark.parametrize("case,expected", [
    (["fid", "{root}/missing", "{root}/fake"], "does not exist"),
    (["fid", "{root}/real", "{root}/empty"], "holds no images"),
    (["fid", "{root}/real", "{root}/single"], "at least 2"),
    (["floor", "{root}/real", "--n", "7"], "need 14"),
])
def test_bad_input_exits_2_with_a_plain_message(folders: Path, case: list[str], expected: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.format(root=folders) for a in case] + ["--cache-dir", str(folders / "cache")]
    code, result, err = run_eval(args, capsys)
    assert code == 2 and result is None and expected in err
    assert "Traceback" not in err


def test_entry_point_exits_2_on_a_missing_folder(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "collafuse-eval"
    assert script.exists(), "the collafuse-eval entry point is missing: run `make install`"
    proc = subprocess.run([str(script), "fid", str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True, text=True, check=False,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0]
