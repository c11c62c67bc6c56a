"""Compare this checkout's run with a committed one: ``python -m pathsynth.report.compare results/<profile>``;
commit a finished run: ``python -m pathsynth.report.compare --save results/<profile>`` (``make results``).

It reads ``metrics/*.json`` here and under the given folder, and prints (1) the claims whose reading differs and
(2) the numbers that differ, largest relative change first. Exit status 1 when a reading differs.

Expected spread (README, "Reproducibility"): the same machine model and thread count give identical numbers
(every difference is then a change of code, data or params); another CPU or a GPU gives numbers within
their confidence intervals, and the readings should not change.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


# timings and places, not results; no "_s" suffix rule: data_prep's min_mean_s is a saturation threshold, a result
SKIP = ("seconds", "images_per_s", "provenance", "path", "page", "folder", "minutes")


def _leaves(v, key: str):
    """(key, value) for every number in a metrics value, lists included: a CI is ``...ci95[0]`` and ``...ci95[1]``
    (``provenance._flatten`` stops at lists, and a rerun whose CIs alone differ must not read as identical)."""
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _leaves(x, f"{key}.{k}" if key else str(k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _leaves(x, f"{key}[{i}]")
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        yield key, float(v)


def numbers(folder: Path) -> dict[str, float]:
    return {f"{p.stem}:{k}": v for p in sorted((folder / "metrics").glob("*.json"))
            for k, v in _leaves(json.loads(p.read_text()), "") if not any(s in k for s in SKIP)}


def readings(folder: Path) -> dict[str, str]:
    p = folder / "metrics" / "report.json"
    if not p.is_file():
        return {}
    return {c["claim"]: c["reading"] for c in json.loads(p.read_text()).get("claims", [])}


def compare(here: Path, there: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    a, b = numbers(there), numbers(here)
    rows = [(k, a[k], b[k], b[k] - a[k], abs(b[k] - a[k]) / max(abs(a[k]), 1e-12)) for k in sorted(set(a) & set(b))
            if a[k] != b[k]]
    num = pd.DataFrame(rows, columns=["metric", "committed", "this run", "difference", "relative"]).sort_values(
        "relative", ascending=False)
    ra, rb = readings(there), readings(here)
    read = pd.DataFrame([(c, ra.get(c, "-"), rb.get(c, "-")) for c in sorted(set(ra) | set(rb)) if ra.get(c) != rb.get(c)],
                        columns=["claim", "committed", "this run"])
    return num, read


KEY_FIGURES = ("fid_umap_coverage_fd", "fid_umap_coverage_c2st", "linear_probe_forest", "linear_probe_efficiency",
               "dino_pretrain_ladder", "guided_sampling_modes", "reader_stats_readers")


def save(root: Path, dest: Path) -> list[Path]:
    """Copy what a reviewer compares against into ``dest``: metrics, dvc.lock, the report, the timings and the key
    figures of the run in ``root``. Refuses a run without a report (the study is not finished)."""
    import shutil

    if not (root / "reports" / "REPORT.md").is_file() or not (root / "metrics" / "report.json").is_file():
        raise SystemExit(f"error: {root} has no finished run (reports/REPORT.md, metrics/report.json): `make repro` first")
    files = [*sorted((root / "metrics").glob("*.json")), root / "dvc.lock", root / "params.yaml",
             root / "reports" / "REPORT.md", root / "reports" / "timings.csv",
             *(root / "reports" / "figures" / f"{f}.png" for f in KEY_FIGURES)]
    out = []
    for f in files:
        rel = f.relative_to(root)
        target = dest / ("figures" / Path(rel.name) if rel.parts[:2] == ("reports", "figures") else
                         Path(rel.name) if rel.parts[0] == "reports" else rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
        out.append(target)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--save":
        written = save(Path.cwd(), Path(argv[1]))
        print(f"wrote {len(written)} files to {argv[1]}")
        return 0
    if len(argv) != 1:
        print("usage: python -m pathsynth.report.compare results/<profile>", file=sys.stderr)
        return 2
    there = Path(argv[0])
    if not (there / "metrics").is_dir():
        print(f"error: {there}/metrics not found (committed runs live in results/<profile>/)", file=sys.stderr)
        return 2
    num, read = compare(Path.cwd(), there)
    n = len(numbers(there))
    print(f"{len(num)} of {n} numbers differ from {there}")
    with pd.option_context("display.width", 160, "display.max_colwidth", 70):
        if len(num):
            print(num.head(30).to_string(index=False))
        print(f"\n{len(read)} claim readings differ" + (":" if len(read) else ""))
        if len(read):
            print(read.to_string(index=False))
    return 1 if len(read) else 0


if __name__ == "__main__":
    raise SystemExit(main())
