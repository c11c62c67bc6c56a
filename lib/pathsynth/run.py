"""Run one stage's notebook through papermill: ``python -m pathsynth.run <stage>``.

This is the command of every DVC stage. It finds ``notebooks/NN_<stage>.ipynb``, executes it from
the study root with the log streamed (papermill --log-output), and writes the executed copy to
``reports/executed/NN_<stage>.ipynb``. The executed copy is written to a temporary name first, so a
failed run never leaves an executed notebook that looks complete.

``python -m pathsynth.run --inline <stage>`` runs the same notebook's code cells in this process,
without a Jupyter kernel or papermill: for machines that have the study's libraries but not the
notebook stack (the lent GPU machine of the ``gpu`` profile). It writes no executed notebook.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .config import project_root


def notebook_for(stage: str, root: Path) -> Path:
    found = sorted((root / "notebooks").glob(f"[0-9][0-9]_{stage}.ipynb"))
    if not found:
        names = sorted(p.stem[3:] for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
        raise SystemExit(f"error: no notebook for stage '{stage}'; stages are: {', '.join(names)}")
    return found[0]


def run_inline(nb: Path, stage: str, root: Path) -> int:
    """Execute the notebook's code cells in order in one namespace (the parameters cell first sets
    ``stage``; it is set again after it, as papermill's injected cell would). Shell and magic lines
    are not supported: the study's notebooks have none."""
    import json
    import os

    cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
    os.chdir(root)
    ns = {"__name__": "__main__", "display": lambda *objs, **_: [print(o) for o in objs]}  # IPython's, as text
    for i, cell in enumerate(cells):
        src = "".join(cell["source"])
        print(f"--- {nb.name} cell {i + 1}/{len(cells)}", flush=True)
        exec(compile(src, f"{nb.name}[cell {i + 1}]", "exec"), ns)
        if "parameters" in cell.get("metadata", {}).get("tags", []) or i == 0:
            ns["stage"] = stage
    return 0


def record_resources(executed: Path, wall_s: float) -> None:
    """Write the stage's wall time (kernel start to finish) and the peak resident memory of its kernel into the
    executed notebook's metadata (``pathsynth``): the report's timing table is made from these records. The
    kernel is this process's child and has exited, so RUSAGE_CHILDREN's ru_maxrss (KiB on Linux) is its peak."""
    import resource

    import nbformat

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    peak_mb = peak / 1024 if sys.platform != "darwin" else peak / 2 ** 20  # macOS reports bytes
    nb = nbformat.read(executed, as_version=4)
    nb.metadata["pathsynth"] = {"wall_s": round(wall_s, 1), "peak_rss_mb": round(peak_mb, 1),
                                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    nbformat.write(nb, executed)


def main(argv=None) -> int:
    import logging

    # papermill streams the notebook's stdout at INFO level: without a handler it would be dropped
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    argv = sys.argv[1:] if argv is None else argv
    inline = argv[:1] == ["--inline"]
    argv = argv[1:] if inline else argv
    if len(argv) != 1:
        print("usage: python -m pathsynth.run [--inline] STAGE", file=sys.stderr)
        return 2
    root = project_root()
    nb = notebook_for(argv[0], root)
    if inline:
        return run_inline(nb, argv[0], root)
    import papermill as pm

    out = root / "reports" / "executed" / nb.name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".running.ipynb")
    t0 = time.time()
    try:
        pm.execute_notebook(str(nb), str(tmp), parameters={"stage": argv[0]}, cwd=str(root),
                            kernel_name="python3", log_output=True, progress_bar=False)
    except pm.PapermillExecutionError as err:
        print(f"error: stage '{argv[0]}' failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
              f"(the executed notebook with the traceback: {tmp.relative_to(root)})", file=sys.stderr)
        return 1
    record_resources(tmp, time.time() - t0)
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
