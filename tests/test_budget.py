"""Each lab fits a 90-minute session by its own plan (labkit.course.budget): every exercise carries its
minutes, the README's time table is the notebooks' own, and no lab's plan leaves less than the machine's
allowance of the session."""
import os

import pytest

from labkit.course import budget

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_lab_fits_a_session_by_its_plan():
    assert budget.over() == [], "move an exercise out of the session (tag it extension) or make the lab shorter"


def test_the_readme_table_is_generated_from_the_notebooks():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        block = budget.readme_block(f.read())
    assert block is not None, "README.md lacks the time table's markers"
    assert block == budget.table(), "regenerate it: python -m labkit.course.budget (between the README's markers)"


def test_an_extensions_heading_says_so_in_both_editions():
    """A student reads which exercises are outside the session: in English and in Korean."""
    import json
    for p in budget.plans():
        extension = {cid for cid, _, ext in p["exercises"] if ext}
        for edition, mark in ((os.path.join(REPO, "notebooks"), "if time allows"),
                              (os.path.join(REPO, "notebooks", "ko"), "시간이 남으면")):
            with open(os.path.join(edition, p["lab"] + ".ipynb"), encoding="utf-8") as f:
                cells = json.load(f)["cells"]
            for i, cell in enumerate(cells):
                if cell.get("id") in extension:
                    before = "".join("".join(c["source"]) + "\n" for c in cells[:i] if c["cell_type"] == "markdown")
                    heading = [ln for ln in before.splitlines() if ln.startswith("### ")][-1]
                    assert mark in heading, (edition, cell["id"], heading)


def test_the_plan_is_read_from_the_cells(tmp_path):
    src = tmp_path / "05-x.md"
    words = " ".join(["word"] * 300)
    src.write_text(f'<!-- #region id="a" -->\n# Title\n\n{words}\n<!-- #endregion -->\n\n'
                   '```python id="b"\nprint(1)\n```\n\n'
                   '```python id="c" tags=["minutes:12"]\nx = None\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n```\n\n'
                   '```python id="d" tags=["minutes:7", "extension"]\ny = None\n### BEGIN SOLUTION\ny = 1\n'
                   '### END SOLUTION\n```\n\n'
                   '```python id="e" tags=["check"]\ncheck.check(...)\n```\n')
    p = budget.plan(str(src))
    assert p["reading"] == 3 and p["demos"] == 1 and p["session"] == 3 + 1 + 12 and p["extension"] == 7
    src.write_text('```python id="c"\nx = None\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n```\n')
    with pytest.raises(ValueError, match="minutes:N"):
        budget.plan(str(src))
    src.write_text('```python id="c" tags=["minutes:5"]\nprint(1)\n```\n')
    with pytest.raises(ValueError, match="belong on exercise cells"):
        budget.plan(str(src))
