"""labkit.course.translate: the Korean edition from one source: every prose cell translated from the English
text that is there now, code cells and ids the English notebook's own, drift caught by check."""
import json
import os
import shutil

import pytest

from labkit.course import notebooks, translate
from labkit.course.runbook import NOTEBOOK_DIR, course_notebooks

KO = os.path.join(NOTEBOOK_DIR, "ko")


def _course_copy(tmp_path, stem="00-setup"):
    d = tmp_path / "nb"
    d.mkdir()
    for ext in (".md", ".ipynb"):
        shutil.copy(os.path.join(NOTEBOOK_DIR, stem + ext), d / (stem + ext))
    return d


def test_a_table_is_started_translated_built_and_its_drift_caught(tmp_path):
    d = _course_copy(tmp_path)
    assert notebooks.main(["--dir", str(d), "skeleton", "--lang", "ko", "00-setup"]) == 0
    table = d / "ko" / "00-setup.yml"
    problems = notebooks.check(str(d))
    assert any("lacks the cells" in p for _, p in problems), problems  # nothing translated yet
    import yaml
    data = yaml.safe_load(table.read_text())
    for cid, entry in data["cells"].items():
        entry["ko"] = f"번역 {cid}\n"
        del entry["english"]
    table.write_text(yaml.safe_dump(data, allow_unicode=True))
    notebooks.build(source_dir=str(d))
    assert notebooks.check(str(d)) == []
    en = json.loads((d / "00-setup.ipynb").read_text())
    ko = json.loads((d / "ko" / "00-setup.ipynb").read_text())
    assert [c["id"] for c in ko["cells"]] == [c["id"] for c in en["cells"]]
    for a, b in zip(en["cells"], ko["cells"]):
        if a["cell_type"] == "code":
            assert a == b, "code cells are the English notebook's own"
        else:
            assert "".join(b["source"]) == f"번역 {a['id']}" and b["metadata"] == a["metadata"]
    assert ko["metadata"]["labkit"] == {"edition": "ko"}

    md = (d / "00-setup.md").read_text()
    first = next(iter(data["cells"]))
    (d / "00-setup.md").write_text(md.replace("A **container**", "A **Linux container**", 1))
    notebooks.build(source_dir=str(d))
    problems = notebooks.check(str(d))
    assert any("older English text" in p and first in p for _, p in problems), problems
    built = json.loads((d / "ko" / "00-setup.ipynb").read_text())
    assert "".join(built["cells"][0]["source"]).startswith(translate.STALE.strip()), "the stale cell shows its English"


def test_tables_that_are_not_tables_are_refused(tmp_path):
    bad = tmp_path / "x.yml"
    bad.write_text("cells: [1, 2]\n")
    with pytest.raises(Exception, match="not a translation table"):
        translate.read_table(str(bad))
    bad.write_text("cells: {a: {ko: x}}\n")
    with pytest.raises(Exception, match="en: digest"):
        translate.read_table(str(bad))
    with pytest.raises(Exception, match="no 'fr' edition"):
        translate.edition_dir("fr")


def test_the_committed_editions_are_complete_and_current():
    if not os.path.isdir(KO):
        pytest.skip("no Korean edition committed yet")
    assert notebooks._edition_problems(NOTEBOOK_DIR) == []
    assert set(course_notebooks(KO)) <= set(course_notebooks(NOTEBOOK_DIR))
    assert os.path.exists(os.path.join(KO, "GLOSSARY.md"))
