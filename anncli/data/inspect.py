"""`ann data inspect`: counts, image sizes, per-class pixel histogram and label sanity of shards."""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from anncli.data.guards import Limits, SampleError, hw_text
from anncli.data.images import decode_label
from anncli.data.manifest import expand_paths, is_remote, load_manifest
from anncli.data.shards import IMAGE_FIELDS, LABEL_FIELD, iter_shard
from anncli.errors import UserError
from anncli.data.labels import IGNORE_INDEX


def _manifest_beside(url: str) -> dict | None:
    m = re.match(r"^(.*)-\d{6}\.tar$", url)
    path = Path(m.group(1) + ".json") if m and not is_remote(url) else None
    try:
        return load_manifest(path) if path and path.is_file() else None
    except UserError:
        return None


def _inspect_shard(url: str, stats: dict, problems: list[str], limits: Limits) -> int:
    count = 0
    try:
        for key, fields in iter_shard(url, limits):
            count += 1
            name = next((f for f in IMAGE_FIELDS if f in fields), None)
            try:
                if name is None or LABEL_FIELD not in fields:
                    raise SampleError("missing field " + ("img.png/img.jpg" if name is None else LABEL_FIELD))
                hw = limits.check_pixels(name, fields[name])
                label = decode_label(fields[LABEL_FIELD], limits)
            except SampleError as e:
                problems.append(f"{url}: sample {key}: {e}")
                continue
            if label.shape != hw:
                problems.append(f"{url}: sample {key}: image {hw_text(hw)} but label {hw_text(label.shape)} (HxW)")
            stats["sizes"][hw_text(hw)] = stats["sizes"].get(hw_text(hw), 0) + 1
            stats["hist"] += np.bincount(label.ravel(), minlength=256)
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{url}: shard unreadable after {count} samples: {e}")
    return count


def inspect_shards(spec: str, as_json: bool = False, limits: Limits = Limits()) -> dict:
    """Counts, image sizes, per-class pixel histogram and label sanity of shards; a table or JSON on stdout.

    `spec` is a shard path, brace pattern or manifest JSON (relative to the current directory). Class names
    come from the manifest beside the shards when there is one. `limits` caps what one member and one
    decoded image may cost.
    """
    urls = expand_paths(os.getcwd(), spec, "the current directory")
    manifest = load_manifest(spec) if spec.endswith(".json") else _manifest_beside(urls[0])
    classes = manifest["classes"] if manifest else None
    stats, problems, shards = {"sizes": {}, "hist": np.zeros(256, np.int64)}, [], []
    for url in urls:
        shards.append({"shard": url, "count": _inspect_shard(url, stats, problems, limits)})
    if not any(s["count"] for s in shards) and not problems:
        problems.append(f"{spec}: no samples (an empty tar, or members without a key.field name)")
    expected = {s["name"]: s["count"] for s in manifest["shards"]} if manifest else {}
    for s in shards:
        want = expected.get(os.path.basename(s["shard"]))
        if want is not None and want != s["count"]:
            problems.append(f"{s['shard']}: {s['count']} samples, manifest says {want}")
    hist = stats["hist"]
    labelled = int(hist[:IGNORE_INDEX].sum())
    ids = range(len(classes)) if classes else [int(i) for i in np.flatnonzero(hist[:IGNORE_INDEX])]
    bad = [int(v) for v in np.flatnonzero(hist[:IGNORE_INDEX]) if classes and v >= len(classes)]
    if bad:
        problems.append(f"label values {bad[:10]} are outside the {len(classes)} class ids and 255")
    report = {
        "spec": spec, "shards": len(urls), "samples": sum(s["count"] for s in shards), "per_shard": shards,
        "image_sizes": dict(sorted(stats["sizes"].items())), "total_pixels": int(hist.sum()),
        "ignore_pixels": int(hist[IGNORE_INDEX]),
        "classes": [{"id": int(i), "name": classes[i] if classes else str(i), "pixels": int(hist[i]),
                     "fraction": float(hist[i] / labelled) if labelled else 0.0} for i in ids],
        "problems": problems, "ok": not problems,
    }
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report)
    return report


def _print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    sizes = ", ".join(f"{k} ({v})" for k, v in report["image_sizes"].items())
    console.print(f"{report['samples']} samples in {report['shards']} shard(s); image sizes: {sizes or '-'}")
    table = Table("id", "class", "pixels", "fraction")
    for c in report["classes"]:
        table.add_row(str(c["id"]), c["name"], f"{c['pixels']:,}", f"{c['fraction']:.2%}")
    table.add_row("255", "ignore", f"{report['ignore_pixels']:,}", "")
    console.print(table)
    problems = report["problems"]
    for p in problems[:20]:  # plain lines: no wrapping, so paths stay whole for grep and CI logs
        print(f"problem: {p}")
    if len(problems) > 20:
        print(f"problem: … and {len(problems) - 20} more (--json lists them all)")
    print("labels ok" if report["ok"] else f"{len(problems)} problem(s)")
