"""How long `ann --help` takes, against `import torch`, and which heavy modules it loads.

Writes benchmarks/results/cli_startup.json. Target: `ann --help` loads no torch, so it answers in a
fraction of the time an `import torch` takes.
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "cli_startup.json"


def _seconds(argv: list[str], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    help_s = _seconds([sys.executable, "-m", "anncli", "--help"])
    torch_s = _seconds([sys.executable, "-c", "import torch"])
    probe = "import sys; from anncli.cli.main import app\ntry: app(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    loads_torch = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {"ann_help_s": round(help_s, 3), "import_torch_s": round(torch_s, 3),
              "ratio_help_over_torch": round(help_s / torch_s, 3), "help_imports_torch": loads_torch.endswith("True")}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
