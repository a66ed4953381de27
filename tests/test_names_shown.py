"""Names of the user's (class folders, files, run folders) shown as they are wherever a person reads them: the
terminal's tables (rich reads [x] as its markup), report.md (Markdown marks, HTML tags) and report.html."""

from __future__ import annotations

import html

from cnnpack.report_render import Block, Literal, to_html, to_markdown
from cnnpack.rundir import Run

NAMES = ["a|b", "<img src=x onerror=alert(1)>", "`tick` *star* [l](x)", "a**b**c", "cat [domestic]", "x$^$y"]


def test_report_md_and_html_show_literal_names_as_they_are(tmp_path):
    rows = [["class", "images"], *([Literal(n), "3"] for n in NAMES), ["our `code` **bold**", "1|2"]]
    md = to_markdown("cnnpack report: r<img src=x onerror=alert(1)>", [Block("table", rows=rows)])
    lines = md.splitlines()[2:]
    for line in lines[2:]:  # every row keeps its two cells: no | of a name splits one
        assert line.replace("\\|", "").count("|") == 3, line
    assert "<img" not in md.replace("\\<img", "") and "\\`tick\\` \\*star\\* \\[l\\](x)" in md
    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark").enable("table").render(md)
    assert "<img" not in rendered and "<code>" not in rendered.split("our")[0] and "<em>" not in rendered
    assert "<h1>cnnpack report: r&lt;img src=x onerror=alert(1)&gt;</h1>" in rendered  # the run folder's name
    for name in NAMES:
        assert f"<td>{html.escape(name, quote=False)}</td>" in rendered, name
    page = to_html("r", [Block("table", rows=rows)], Run(tmp_path))
    for name in NAMES:
        assert f"<td>{html.escape(name)}</td>" in page, name
    assert "<td>our <code>code</code> <b>bold</b></td>" in page  # the report's own marks still render


def test_the_terminal_tables_print_names_with_brackets_as_they_are(capsys):
    from cnnpack.cli.pipeline_cmd import print_summary
    from cnnpack.cli.train_cmd import _print_eval

    classes = ["[bold]", "[red]warn", "cat [domestic]", "cat [wild]"]
    _print_eval({"format": "checkpoint", "accuracy": 0.5, "images": 8, "classes": classes,
                 "confusion_matrix": [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]],
                 "per_class_acc": [1.0, 1.0, 0.5, 0.5], "output": "eval-checkpoint.json"})
    out = capsys.readouterr().out
    for c in classes:
        assert c in out, c
    repo = "/tmp/[v2]repo"
    print_summary({"accuracy": 0.5, "parity_passed": None, "precision": [], "best_runtime": None,
                   "repository": repo, "models": ["cnn_onnx"], "served": None, "stages": [],
                   "report": {"markdown": "/r/[v2] run/report.md", "html": "/r/[v2] run/report.html"}, "wall_s": 1})
    out = " ".join(capsys.readouterr().out.split())
    assert "cnnpack serve --repository '/tmp/[v2]repo'" in out.replace("│ ", "").replace(" │", "")
    assert "[v2] run/report.md" in out
