"""Self-contained HTML reports: one stylesheet, escaping, tables, and atomic HTML+JSON writes.

The compliance report (``confide audit report``) and the simulation and cost reports
(``confide sim run`` / ``confide sim estimate``) are single pages a reviewer can open
offline or attach to a ticket: inline CSS, plots as data URIs, no script, no URL
(a Content-Security-Policy says so to the browser).
"""

from __future__ import annotations

import base64
import html
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from confide.errors import ConfideError

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;color:#1b1f23;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ccc}
h3{margin-top:1.4em}.muted{color:#666;font-size:.9em}
.verdict{padding:1em 1.2em;border-radius:6px;margin:1em 0;font-size:1.1em}
.pass{background:#e6f4ea;border:1px solid #34a853}.fail{background:#fce8e6;border:1px solid #d93025}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#188038;font-weight:600}.bad{color:#d93025;font-weight:600}.warn{color:#b06000}
code,pre{font-family:SFMono-Regular,Consolas,monospace;font-size:.85em}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;border:1px solid #e1e4e8}
.uid{font-family:monospace;font-size:.8em}img{max-width:100%}
"""


class ReportError(ConfideError):
    """A report's inputs cannot be read, or the report cannot be written; says which and the fix."""


def esc(v: Any) -> str:
    """``v`` as HTML text (``None`` is empty)."""
    return html.escape("" if v is None else str(v), quote=True)


def num(v: Any, fmt: str = ".4f") -> str:
    """A number for a table cell; ``None`` is a dash."""
    if v is None:
        return "&ndash;"
    if isinstance(v, float):
        return esc(format(v, fmt))
    return esc(v)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: set[int]) -> str:
    """An HTML table; cells are already HTML, columns in ``numeric`` align right."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def bullets(items: Iterable[Any], cls: str = "") -> str:
    """An HTML list of ``items`` (escaped), each with class ``cls`` if given."""
    attr = f" class='{esc(cls)}'" if cls else ""
    return "<ul>" + "".join(f"<li{attr}>{esc(i)}</li>" for i in items) + "</ul>"


def okmark(ok: bool, yes: str = "OK", no: str = "FAIL") -> str:
    return f'<span class="ok">{esc(yes)}</span>' if ok else f'<span class="bad">{esc(no)}</span>'


def png_img(png: bytes, alt: str) -> str:
    """An ``<img>`` carrying ``png`` as a data URI."""
    data = base64.b64encode(png).decode("ascii")
    return f"<img alt='{esc(alt)}' src='data:image/png;base64,{data}'>"


def page_head(title: str) -> str:
    """Doctype, CSP (images from data URIs only, no script, no URL), title and the CSS."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
    )


def write_html_json(
    html_text: str, html_path: Path | None, report: Mapping[str, Any], json_path: Path | None
) -> list[Path]:
    """Write the page and/or the JSON atomically (temp file, then rename); returns the paths."""
    todo: list[tuple[Path, str]] = []
    if html_path is not None:
        todo.append((Path(html_path), html_text))
    if json_path is not None:
        text = json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
        todo.append((Path(json_path), text))
    out = []
    for path, text in todo:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            shutil.move(str(tmp), path)
        except OSError as e:
            raise ReportError(
                f"cannot write {path} ({e.strerror or e}). Fix: pass a writable path"
            ) from None
        out.append(path)
    return out


__all__ = [
    "CSS",
    "ReportError",
    "bullets",
    "esc",
    "num",
    "okmark",
    "page_head",
    "png_img",
    "table",
    "write_html_json",
]
