"""``sdjax report``: the page a person opens in a browser (report.html) for an existing evaluation run."""
from __future__ import annotations

from .common import UsageError


def register(sub):
    """Add the subcommand and its arguments to ``sub`` (argparse subparsers)."""
    p = sub.add_parser("report", help="write report.html, the run's numbers, plots and images as one page that "
                       "works offline, for a folder `sdjax eval` wrote",
                       description="Write EVAL_DIR/report.html and EVAL_DIR/report_files/ (plotly.js, and the "
                       "images as one sprite sheet PNG per recipe) from the folder alone: report.json and the images "
                       "kept in state/. No model is loaded. `sdjax eval` writes the same page at the end of a run; "
                       "this redraws it, e.g. for a run made before the page existed. The page makes no request to "
                       "any other host.")
    p.add_argument("eval_dir", metavar="EVAL_DIR", help="the folder of a finished `sdjax eval` run")
    p.set_defaults(func=run)


def run(args):
    from sdjax.evaluation import html_report
    try:
        written = html_report.write_html(args.eval_dir)
    except html_report.ReportError as e:
        raise UsageError(str(e)) from None
    print(f"wrote {written['html']} and {written['folder']}/ ({written['bytes'] / 1e6:.1f} MB together)")
