"""Print the demo's ANN and FCN validation mIoU side by side and write benchmarks/results/demo.json."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(ann_json: str, fcn_json: str) -> int:
    ann, fcn = (json.loads(Path(p).read_text()) for p in (ann_json, fcn_json))
    names = [row["name"] for row in ann["per_class"]]
    print(f"{'class':<22}{'ANN IoU':>10}{'FCN IoU':>10}")
    for name, a, f in zip(names, ann["per_class"], fcn["per_class"]):
        print(f"{name:<22}{a['IoU'] * 100:>10.2f}{f['IoU'] * 100:>10.2f}")
    gap = ann["mIoU"] - fcn["mIoU"]
    print(f"{'mIoU':<22}{ann['mIoU'] * 100:>10.2f}{fcn['mIoU'] * 100:>10.2f}   (ANN - FCN = {gap * 100:+.2f})")
    result = {"ann_mIoU": ann["mIoU"], "fcn_mIoU": fcn["mIoU"], "gap": gap}
    out = ROOT / "benchmarks" / "results" / "demo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
