"""Helpers of the project's static HTML reports (data quality, training run): style, tables,
PNG figures (matplotlib on the headless Agg backend: import ``plt`` from here) and a small inline
script that marks images failing to load and records ``data-images-loaded="k/n"`` on ``<body>``
(the rendering tests read it through headless Chromium).
"""

from __future__ import annotations

import html
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)

__all__ = ["IMAGES_SCRIPT", "STYLE", "escape", "img", "plt", "save_figure", "table"]

IMAGES_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; }
    else {
      imgs[i].insertAdjacentHTML('afterend',
        '<p class="broken">image failed to load: ' + imgs[i].getAttribute('src') + '</p>');
    }
  }
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
</script>"""
STYLE = """<style>
body { font-family: sans-serif; margin: 2em; max-width: 1100px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #bbb; padding: 3px 8px; vertical-align: top; text-align: left; font-size: 13px; }
pre { white-space: pre-wrap; margin: 0; max-height: 9em; overflow: auto; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.broken { color: #b00; font-weight: bold; }
</style>"""


def escape(text) -> str:
    return html.escape(str(text))


def table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table; ``rows`` cells are HTML (escape text first)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(name: str, alt: str) -> str:
    return f"<img src='{escape(name)}' alt='{escape(alt)}'>"


def save_figure(fig, path: pathlib.Path, dpi: int = 80) -> str:
    """Save ``fig`` as ``path`` (PNG), close it; returns the file name (for ``img``)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path.name
