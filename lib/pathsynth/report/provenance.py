"""Provenance of a study run, read from what the run left: git, dvc.lock, params.yaml against its profile,
and the executed notebooks (each begins with the stage's header line, and ``pathsynth.run`` writes the
stage's wall time and peak memory into its metadata)."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pandas as pd
import yaml

from .. import config
from ..runtime import git_sha
from .claims import STAGES

HEADER = "pathsynth stage '"


def lock_digest(root: Path, exclude: tuple[str, ...] = ("report",)) -> str:
    """sha256 (12 hex) of dvc.lock's entries for the study's stages: the report's own entry is left out,
    since it is written after the report."""
    p = root / "dvc.lock"
    if not p.is_file():
        return "no dvc.lock"
    lock = yaml.safe_load(p.read_text()) or {}
    stages = {k: v for k, v in (lock.get("stages") or {}).items() if k not in exclude}
    return hashlib.sha256(json.dumps(stages, sort_keys=True).encode()).hexdigest()[:12]


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def params_diff(root: Path) -> pd.DataFrame:
    """Every setting of params.yaml that differs from its profile (profiles/defaults.yaml + profiles/<profile>.yaml)."""
    run = yaml.safe_load((root / "params.yaml").read_text()) or {}
    prof = config.profile_params(run.get("profile", "tiny"), root)
    a, b = _flatten(prof), _flatten(run)
    rows = [(k, a.get(k, "(absent)"), b.get(k, "(absent)")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return pd.DataFrame(rows, columns=["setting", "profile", "this run"])


def executed_notebook(root: Path, stage: str) -> Path | None:
    found = sorted((root / "reports" / "executed").glob(f"[0-9][0-9]_{stage}.ipynb"))
    return found[0] if found else None


# the log line of pathsynth.training on a resume past step 0, or of runtime.log_reused on finished work reused
RESUMED = re.compile(r"^\S.*: resumed from .* \((?:step [1-9]\d*/\d+|finished earlier: .+)\)")


def stage_record(nb_path: Path) -> dict:
    """The header the stage printed (device, CPU, threads, versions, git), its resources, and whether it resumed
    work left by an earlier execution: a training loop's checkpoint, cached CNN runs, finished sampling shards (then
    its wall time is that of this execution only, not of the whole stage)."""
    nb = json.loads(nb_path.read_text())
    header, resumed = {}, False
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            text = "".join(out.get("text", "")) if out.get("output_type") == "stream" else ""
            for line in text.splitlines():
                if not header and line.startswith(HEADER):
                    header = json.loads(line.split("  ", 1)[1])
                m = RESUMED.search(line.split(" INFO ", 1)[-1])
                resumed = resumed or bool(m)
    res = nb.get("metadata", {}).get("pathsynth", {})
    pm = nb.get("metadata", {}).get("papermill", {})
    return {"header": header, "wall_s": res.get("wall_s", pm.get("duration")), "resumed": resumed,
            "peak_rss_mb": res.get("peak_rss_mb"), "finished": res.get("finished", pm.get("end_time"))}


def timings(root: Path, stages=STAGES) -> pd.DataFrame:
    """Wall time and peak memory per stage, from the executed notebooks (not typed)."""
    rows = []
    for stage in stages:
        nb = executed_notebook(root, stage)
        if nb is None:
            rows.append((stage, None, None, None, None, None, None))
            continue
        r = stage_record(nb)
        h = r["header"]
        rows.append((stage, r["wall_s"], r["peak_rss_mb"], h.get("device"), h.get("cpu"), h.get("torch_threads"), r["resumed"]))
    df = pd.DataFrame(rows, columns=["stage", "wall_s", "peak_rss_mb", "device", "cpu", "torch_threads", "resumed"])
    df["minutes"] = (df.wall_s / 60).round(1)
    return df


def provenance(root: Path) -> dict:
    run = yaml.safe_load((root / "params.yaml").read_text()) or {}
    recs = {s: stage_record(nb) for s in STAGES if (nb := executed_notebook(root, s)) is not None}
    headers = [r["header"] for r in recs.values() if r["header"]]
    first = headers[-1] if headers else {}
    gits = sorted({h.get("git", "unknown") for h in headers})
    return {"git": git_sha(root), "stages_git": gits, "dvc_lock": lock_digest(root), "profile": run.get("profile"),
            "seed": run.get("seed"), "device": sorted({h.get("device", "?") for h in headers}),
            "gpu": sorted({h["gpu"] for h in headers if h.get("gpu")}), "cpu": first.get("cpu"),
            "host": first.get("host"), "torch_threads": sorted({h.get("torch_threads") for h in headers if h}),
            "versions": first.get("versions", {})}


# ------------------------------------------------------------------------------ the README's timing table
BEGIN, END = "<!-- timings: generated by `python -m pathsynth.report.provenance readme`; do not edit -->", "<!-- /timings -->"


def _resumed(row) -> bool:
    return "resumed" in row and not pd.isna(row["resumed"]) and bool(row["resumed"])  # older timings.csv: no column


def timing_table(results: Path, stages=STAGES) -> str:
    """Wall time and peak memory per stage and in total, one column per committed run (results/<profile>/timings.csv,
    written by the report stage from the executed notebooks' records). A stage that resumed work of an earlier
    execution (``stage_record``) is marked "(resumed)": its time is that of its last execution only."""
    runs = {p.parent.name: pd.read_csv(p).set_index("stage") for p in sorted(results.glob("*/timings.csv"))}
    if not runs:
        return "No committed run yet: `make results` after a full `make repro`."
    head = "| stage | " + " | ".join(runs) + " |\n| --- |" + " --- |" * len(runs)
    rows = []
    for stage in stages:
        cells = []
        for t in runs.values():
            if stage not in t.index or pd.isna(t.loc[stage, "wall_s"]):
                cells.append("not run")
                continue
            r = t.loc[stage]
            peak = "" if pd.isna(r.peak_rss_mb) else f", {r.peak_rss_mb / 1024:.1f} GB"
            cells.append(f"{r.wall_s / 60:.1f} min{peak}" + (" (resumed)" if _resumed(r) else ""))
        rows.append(f"| {stage} | " + " | ".join(cells) + " |")
    total = [f"**{t.wall_s.sum() / 60:.1f} min**" + ("" if t.wall_s.notna().all() else " (stages run so far)")
             + (" (the last execution of resumed stages only)" if any(_resumed(r) for _, r in t.iterrows()) else "")
             for t in runs.values()]
    rows.append("| whole study | " + " | ".join(total) + " |")
    devices = [f"{t.device.dropna().iloc[0] if t.device.notna().any() else '?'}, {t.cpu.dropna().iloc[0] if t.cpu.notna().any() else '?'}, "
               f"{int(t.torch_threads.dropna().iloc[0]) if t.torch_threads.notna().any() else '?'} threads" for t in runs.values()]
    rows.append("| device | " + " | ".join(devices) + " |")
    return "\n".join([head, *rows])


def update_readme(readme: Path, results: Path) -> bool:
    """Rewrite the table between the README's timing markers; True if it changed."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {readme} has no timing markers ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{timing_table(results)}\n{END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["readme"]:
        raise SystemExit("usage: python -m pathsynth.report.provenance readme")
    root = config.project_root()
    changed = update_readme(root / "README.md", root / "results")
    print("README.md timing table " + ("updated" if changed else "already up to date"))
