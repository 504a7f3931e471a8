"""Results outlive a failing write: `ann eval --json` and `ann bench --json` under a real file-size limit
(RLIMIT_FSIZE, set in the child before it starts) print the table and the JSON on stdout, say so in one
line and exit non-zero, leaving no truncated file."""

import json
import resource
import signal
import subprocess

import pytest

from conftest import ROOT, ann_cmd, ann_env
from test_eval_run import write_checkpoint, write_recipe, write_split


def _limited(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as in a shell that ignores it: writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _run_limited(args, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run(ann_cmd(*args), capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=ann_env(PYTHONDONTWRITEBYTECODE="1"), preexec_fn=_limited(limit))


def _json_in(stdout: str) -> dict:
    start = stdout.index("\n{") + 1
    return json.loads(stdout[start:stdout.rindex("}") + 1])


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_a_result_over_the_file_size_limit_goes_to_stdout(tmp_path, command):
    out = tmp_path / "result.json"
    if command == "eval":
        write_split(tmp_path / "data", "val", [2])
        recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "data")
        args = ["eval", recipe, "--checkpoint", write_checkpoint(tmp_path / "run", recipe), "--json", out]
    else:
        args = ["bench", "attention", "--sizes", "8x8", "--channels", "16", "--repeats", "1", "--json", out]
    res = _run_limited(args, 300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    line = [x for x in res.stderr.splitlines() if x.startswith("ann: error:")]
    assert line and "file too large" in line[0] and "printed on stdout" in line[0], res.stderr[-2000:]
    report = _json_in(res.stdout)
    assert ("mIoU" in report and "per_class" in report) if command == "eval" else report["results"]
    assert not out.exists() and not list(tmp_path.glob(".result.json.tmp*"))
