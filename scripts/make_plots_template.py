"""Write .dvc/plots/offline.html: the page template `dvc plots show` fills, with Vega, Vega-Lite and Vega-Embed
inlined, so the plots page works offline (DVC's own template loads them from a CDN: a blank page here).

The libraries come bundled by vl-convert-python (BSD-3-Clause, like Vega), which is needed only to remake the
template, not to use it:  pip install vl-convert-python==1.7.0 && python scripts/make_plots_template.py
"""
from pathlib import Path

import vl_convert

BUNDLE = vl_convert.javascript_bundle("window.__vegaEmbed = vegaEmbed;")
PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>pathsynth: the study's plots (dvc plots show)</title>
<!-- Vega 5, Vega-Lite 5 and Vega-Embed 6 (BSD-3-Clause, the Vega authors), bundled by vl-convert-python %s;
     remade by scripts/make_plots_template.py. DVC's scripts placeholder (its CDN tags) is deliberately left out. -->
<script>%s</script>
<script>var vegaEmbed = window.__vegaEmbed;</script>
<style>body{font-family:system-ui,sans-serif;margin:1em}table{border-spacing:15px}img{max-width:900px}</style>
</head>
<body>
<h1>pathsynth: curves and figures of this run</h1>
{plot_divs}
</body>
</html>
"""
out = Path(__file__).resolve().parents[1] / ".dvc" / "plots" / "offline.html"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(PAGE % (getattr(vl_convert, "__version__", "1.7.0"), BUNDLE))
print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB)")
