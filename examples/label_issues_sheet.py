"""A contact sheet (JPEG) of the most suspect training images of a cross-fitted zoo: given vs suggested label.

    python examples/label_issues_sheet.py runs/hymenoptera-probes/ensemble.json ../shared/datasets/hymenoptera sheet.jpg

The same grid as report.html's section, as a small file for a page: the first argument is what
`zoo label-issues` takes (an ensemble file or cross-fitted runs), the second the dataset.
"""

from __future__ import annotations

import sys

from zoo.data import read_listing
from zoo.pipeline.label_issues import label_issues
from zoo.pipeline.report_html import label_issues_figure


def main(source: str, data: str, out: str, n: int = 24) -> None:
    issues = label_issues([source])
    fig = label_issues_figure(issues, read_listing(data), n=n, cols=6, size=1.7)
    fig.savefig(out, dpi=80, pil_kwargs={"quality": 70, "optimize": True})
    print(f"{issues.summary()}; the {n} most suspect -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
