"""Print the demo's ANN and FCN validation mIoU side by side; with --out, write them as JSON.

    python benchmarks/demo_compare.py runs/demo/metrics.json runs/demo-fcn/metrics.json --out runs/demo-compare.json

`make demo` writes under runs/ (ignored by git); the committed benchmarks/results/demo.json is written
only when asked for: --out benchmarks/results/demo.json.
"""

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ann_json", type=Path)
    parser.add_argument("fcn_json", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write {ann_mIoU, fcn_mIoU, gap} here")
    args = parser.parse_args(argv)
    ann, fcn = (json.loads(p.read_text()) for p in (args.ann_json, args.fcn_json))
    names = [row["name"] for row in ann["per_class"]]
    print(f"{'class':<22}{'ANN IoU':>10}{'FCN IoU':>10}")
    for name, a, f in zip(names, ann["per_class"], fcn["per_class"]):
        print(f"{name:<22}{a['IoU'] * 100:>10.2f}{f['IoU'] * 100:>10.2f}")
    gap = ann["mIoU"] - fcn["mIoU"]
    print(f"{'mIoU':<22}{ann['mIoU'] * 100:>10.2f}{fcn['mIoU'] * 100:>10.2f}   (ANN - FCN = {gap * 100:+.2f})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"ann_mIoU": ann["mIoU"], "fcn_mIoU": fcn["mIoU"], "gap": gap}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
