"""REPORT.md (reads on any git host) and its offline HTML rendering with every figure embedded.

Markdown tables are written by pandas (``to_markdown`` needs tabulate, which the study does not carry, so a
small writer here escapes the pipes); the HTML is mistune's rendering of the same text, with each figure
inlined as a data URI and no external URL anywhere (checked before writing)."""
from __future__ import annotations

import base64
import re
from pathlib import Path

import pandas as pd

URL = re.compile(r"(?:https?|ftp)://|//[a-z0-9.-]+\.[a-z]{2,}/", re.I)


class ExternalURLError(ValueError):
    pass


def md_table(df: pd.DataFrame) -> str:
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return "-"
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(map(cell, df.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


def figure_index(root: Path) -> pd.DataFrame:
    """Every figure under reports/figures with the executed notebook that made it (file names begin with
    the stage's name: reports/figures/<stage>_<what>.png)."""
    from .claims import STAGES
    from .provenance import executed_notebook

    rows = []
    for stage in (*STAGES, "report"):
        nb = executed_notebook(root, stage)
        for fig in sorted((root / "reports" / "figures").glob(f"{stage}_*.png")):
            rows.append((stage, fig.name, f"figures/{fig.name}", f"executed/{nb.name}" if nb else None))
    return pd.DataFrame(rows, columns=["stage", "figure", "path", "notebook"])


def inline_images(html: str, base: Path) -> str:
    """Replace every <img src="relative.png"> with a data URI of the file (a missing file is an error)."""
    def repl(m):
        src = m.group(2)
        if src.startswith("data:"):
            return m.group(0)
        p = base / src
        if not p.is_file():
            raise FileNotFoundError(f"the report names {src}, which does not exist ({p})")
        data = base64.b64encode(p.read_bytes()).decode()
        return f'{m.group(1)}data:image/png;base64,{data}{m.group(3)}'

    return re.sub(r'(<img[^>]*?src=")([^"]+)(")', repl, html)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;font-size:.85em;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .5em;
vertical-align:top}th{background:#f3f3f3}img{max-width:100%}code{background:#f6f6f6;padding:0 .2em}
figure{margin:1.5em 0}figcaption{font-size:.85em;color:#555}"""


def to_html(md: str, base: Path, title: str, appendix: pd.DataFrame | None = None) -> str:
    """The offline HTML of the report: mistune's rendering, every image inlined, the figure appendix
    embedded; raises ExternalURLError where any external URL is left."""
    import mistune

    body = mistune.html(md)
    if appendix is not None and len(appendix):
        figs = "".join(f'<figure id="{r.figure}"><img src="{r.path}" alt="{r.figure}"><figcaption>{r.figure}, made by '
                       f'<code>{r.notebook or "-"}</code></figcaption></figure>' for r in appendix.itertuples())
        body += f"<h2>Appendix: every figure</h2>{figs}"
    html = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body>{inline_images(body, base)}</body></html>\n")
    check_offline(html)
    return html


def check_offline(html: str) -> None:
    text = re.sub(r'data:image/png;base64,[A-Za-z0-9+/=]+', "", html)
    m = URL.search(text)
    if m:
        raise ExternalURLError(f"the report HTML would load or link an external URL: ...{text[max(0, m.start() - 60):m.end() + 60]}...")


def write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
