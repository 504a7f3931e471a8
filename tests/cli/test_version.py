"""`ann --version`: the package version and the torch/CUDA it runs on, in one line, from any directory."""

from __future__ import annotations

import re
import subprocess

from conftest import ann_cmd, ann_env


def test_version_is_one_line_with_the_package_torch_and_cuda(tmp_path):
    from anncli.version import __version__

    done = subprocess.run(ann_cmd("--version"), cwd=tmp_path, env=ann_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    line = re.escape(f"ann {__version__} (torch ")
    assert re.fullmatch(line + r"\S+, (CUDA none|(CUDA|ROCm) \S+, \d+ GPUs? visible)\)\n", done.stdout), done.stdout

