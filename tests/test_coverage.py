"""The README's coverage table is the notebooks' own tags (labkit.course.coverage), and every lecture topic is
taught: by a demo or a picture, and where a student can act, by an exercise with its check."""
import os

import pytest

from labkit.course import coverage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_readme_table_is_generated_from_the_tags():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        block = coverage.readme_block(f.read())
    assert block is not None, "README.md lacks the coverage table's markers"
    assert block == coverage.table(), "regenerate it: python -m labkit.course.coverage (between the README's markers)"


def test_every_lecture_topic_is_taught():
    assert coverage.gaps() == []


def test_a_cells_kind_comes_from_the_cell(tmp_path):
    src = tmp_path / "05-x.md"
    src.write_text('```python id="a" tags=["lecture:nginx"]\nprint(1)\n```\n'
                   '```python id="b" tags=["lecture:nginx"]\nx = None\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n```\n'
                   '```python id="c" tags=["check", "lecture:nginx"]\ncheck.check(...)\n```\n'
                   '```python id="d" tags=["lecture:union-fs"]\nplotting.save(fig, d, "x")\n```\n'
                   '```python id="e"\nprint("untagged")\n```\n')
    cov = coverage.coverage(str(tmp_path))
    assert cov["nginx"] == {"demo": ["05"], "picture": [], "exercise": ["05"], "check": ["05"]}
    assert cov["union-fs"]["picture"] == ["05"]
    src.write_text('```python id="a" tags=["lecture:nope"]\nprint(1)\n```\n')
    with pytest.raises(ValueError, match="unknown lecture topic"):
        coverage.coverage(str(tmp_path))
