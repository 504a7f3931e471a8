"""`make demo` leaves a checkout clean: what it writes goes under runs/, never over committed results."""

import json
import re
import subprocess
import sys

from conftest import ROOT


def _demo_target() -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = lines.index("demo: $(STAMP)") + 1
    recipe = []
    for line in lines[start:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_every_file_the_demo_writes_is_under_runs():
    commands = _demo_target()
    assert any("plot runs/demo runs/demo-fcn --out runs/" in c for c in commands)
    assert any("plot runs/demo/metrics.json runs/demo-fcn/metrics.json --out runs/" in c for c in commands)
    outputs = [m for c in commands for m in re.findall(r"--(?:out|json) (\S+)", c)]
    assert len(outputs) == 5, commands
    assert all(path.startswith("runs/") for path in outputs), outputs


def test_demo_compare_writes_only_where_asked(tmp_path):
    metrics = {"mIoU": 0.9, "per_class": [{"name": "a", "IoU": 0.9}]}
    for name, value in (("ann", 0.9), ("fcn", 0.5)):
        (tmp_path / f"{name}.json").write_text(json.dumps({**metrics, "mIoU": value}))
    committed = ROOT / "benchmarks" / "results" / "demo.json"
    before = committed.read_bytes()
    script = [sys.executable, str(ROOT / "benchmarks" / "demo_compare.py"), tmp_path / "ann.json", tmp_path / "fcn.json"]
    res = subprocess.run(script, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and "+40.00" in res.stdout, res.stderr
    assert committed.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ann.json", "fcn.json"]
    res = subprocess.run([*script, "--out", tmp_path / "runs" / "compare.json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "runs" / "compare.json").read_text())["gap"] == 0.9 - 0.5
    assert committed.read_bytes() == before
