"""The notebooks' source is their text (notebooks/NN-title.md, jupytext's markdown): every committed
.ipynb is exactly what its text builds, every text has its notebook and every notebook its text, every
cell has an id of its own, and a change to a line of prose is a change to that line only. Fast, no root."""
import difflib
import json
import os
import shutil

import pytest

from labkit.course import notebooks
from labkit.course.runbook import NOTEBOOK_DIR, course_notebooks
from labkit.wire.errors import InvalidSpec

PAIRS = notebooks.pairs()


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_every_text_has_its_notebook_and_every_notebook_its_text():
    assert sorted(f"{stem}.ipynb" for stem in PAIRS) == course_notebooks()
    lone = {stem: paths for stem, paths in PAIRS.items() if None in paths}
    assert lone == {}, "a text without its .ipynb, or an .ipynb without its text"


@pytest.mark.parametrize("stem", sorted(PAIRS))
def test_committed_notebook_is_what_its_text_builds(stem):
    text, ipynb = PAIRS[stem]
    built = notebooks.build_text(_read(text), os.path.basename(text))
    assert built == _read(ipynb), (f"{stem}.ipynb is not what {stem}.md builds: edit the .md and run "
                                   "`python -m labkit.course.notebooks build`")
    with open(ipynb, "rb") as f:
        assert f.read() == built.encode("utf-8"), "byte for byte (LF, UTF-8)"


@pytest.mark.parametrize("stem", sorted(PAIRS))
def test_every_cell_has_an_id_of_its_own_and_no_outputs(stem):
    nb = json.loads(_read(PAIRS[stem][1]))
    assert (nb["nbformat"], nb["nbformat_minor"]) == (4, 5)
    ids = [c.get("id") for c in nb["cells"]]
    assert all(isinstance(i, str) and i for i in ids), "a cell without an id"
    assert len(set(ids)) == len(ids), f"an id used twice: {sorted(i for i in ids if ids.count(i) > 1)}"
    assert [c["metadata"].get("tags") for c in nb["cells"]].count(["parameters"]) == 1
    for c in nb["cells"]:
        assert "id" not in c["metadata"], "the id lives in cell.id, not in the metadata"
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None, c["id"]
    assert nb["metadata"]["jupytext"]["formats"] == notebooks.FORMATS


def test_check_passes_and_names_what_is_wrong(tmp_path, capsys):
    assert notebooks.check() == []
    assert notebooks.main(["check"]) == 0
    for stem in ("00-setup", "01-chroot", "02-namespaces"):
        for path in PAIRS[stem]:
            shutil.copy(path, tmp_path)
    with open(tmp_path / "00-setup.ipynb", "a", encoding="utf-8") as f:
        f.write("\n")                                   # a stale notebook
    os.unlink(tmp_path / "01-chroot.ipynb")             # a text without its notebook
    os.unlink(tmp_path / "02-namespaces.md")            # a notebook without its text
    capsys.readouterr()
    assert notebooks.main(["--dir", str(tmp_path), "check"]) == 1
    err = capsys.readouterr().err
    assert "00-setup.ipynb: is not what 00-setup.md builds" in err
    assert "01-chroot.md: has no notebook" in err
    assert "02-namespaces.ipynb: has no text" in err
    assert notebooks.build(["00-setup", "01-chroot.md"], str(tmp_path)) == [str(tmp_path / "00-setup.ipynb"),
                                                                           str(tmp_path / "01-chroot.ipynb")]
    assert [p for p, _ in notebooks.check(str(tmp_path))] == [str(tmp_path / "02-namespaces.ipynb")]
    assert notebooks.build(["00-setup"], str(tmp_path)) == [], "an up-to-date notebook is not rewritten"
    assert os.stat(tmp_path / "00-setup.ipynb").st_mtime_ns <= os.stat(tmp_path / "00-setup.md").st_mtime_ns, \
        "never newer than its text (jupytext in JupyterLab would call the text outdated)"


def test_a_prose_edit_changes_only_that_cell(tmp_path):
    text, ipynb = PAIRS["00-setup"]
    old = _read(text)
    line = "host is protected from it. The lecture sums up what that buys as four words: *standard* (every container has"
    assert old.count(line) == 1
    edited = tmp_path / "00-setup.md"
    edited.write_text(old.replace(line, line.replace("four words", "four plain words")), encoding="utf-8")
    before = json.loads(_read(ipynb))["cells"]
    after_text = notebooks.build_text(edited.read_text(encoding="utf-8"))
    after = json.loads(after_text)["cells"]
    assert [c["id"] for c in after] == [c["id"] for c in before]
    changed = [a["id"] for a, b in zip(after, before) if a != b]
    assert changed == ["00-00"]
    diff = [d for d in difflib.ndiff(_read(ipynb).splitlines(), after_text.splitlines()) if d[:1] in "+-"]
    as_json = lambda s: "    " + json.dumps(s + "\n", ensure_ascii=False) + ","  # noqa: E731 (a line of the .ipynb)
    assert diff == ["- " + as_json(line), "+ " + as_json(line.replace("four words", "four plain words"))]


def test_a_cell_without_an_id_or_with_a_taken_one_does_not_build():
    text = _read(PAIRS["00-setup"][0])
    assert '```python id="00-02"\n' in text and '<!-- #region id="00-03" -->' in text
    with pytest.raises(InvalidSpec, match="cell 2 .*has no id"):
        notebooks.build_text(text.replace('```python id="00-02"\n', "```python\n"), "00-setup.md")
    with pytest.raises(InvalidSpec, match="cell 3 .*has no id"):
        notebooks.build_text(text.replace('<!-- #region id="00-03" -->', "<!-- #region -->"), "00-setup.md")
    with pytest.raises(InvalidSpec, match="has the id '00-01' of cell 1"):
        notebooks.build_text(text.replace('```python id="00-02"\n', '```python id="00-01"\n'), "00-setup.md")
    with pytest.raises(InvalidSpec, match="nbformat refuses"):
        notebooks.build_text(text.replace('```python id="00-02"\n', '```python id="00 02"\n'), "00-setup.md")


@pytest.mark.parametrize("stem", sorted(PAIRS))
def test_import_of_a_committed_notebook_builds_it_again(stem):
    """`import` (a notebook edited without jupytext back to text) loses nothing: ids, tags, sources."""
    import nbformat
    ipynb = _read(PAIRS[stem][1])
    text = notebooks.text_from_notebook(nbformat.reads(ipynb, as_version=4))
    assert notebooks.build_text(text) == ipynb


def test_the_course_still_lists_the_built_notebooks():
    """runbook and assign read the .ipynb; the texts and notebooks/README.md are not notebooks to them."""
    assert NOTEBOOK_DIR == os.path.dirname(PAIRS["00-setup"][0])
    assert all(name.endswith(".ipynb") for name in course_notebooks())


@pytest.mark.parametrize("stem", sorted(PAIRS))
def test_every_notebook_is_a_slide_deck_split_at_its_headings(stem):
    """RISE (jupyterlab-rise) shows a notebook as slides from its cells' slideshow metadata: the build puts a
    new slide at each # and ## heading and a sub-slide at each ###, and the text stays free of it."""
    nb = json.loads(_read(os.path.join(NOTEBOOK_DIR, stem + ".ipynb")))
    kinds = [c["metadata"].get("slideshow", {}).get("slide_type") for c in nb["cells"]]
    assert kinds[0] == "slide" and kinds.count("slide") >= 3, kinds
    for c, kind in zip(nb["cells"], kinds):
        first = next((ln for ln in "".join(c["source"]).splitlines() if ln.strip()), "")
        want = "slide" if c["cell_type"] == "markdown" and first.startswith(("# ", "## ")) else \
            "subslide" if c["cell_type"] == "markdown" and first.startswith("### ") else None
        assert kind == want, (c["id"], first, kind)
    assert "slideshow" not in _read(os.path.join(NOTEBOOK_DIR, stem + ".md")), "derived, not written in the text"
    import nbformat
    assert "slideshow" not in notebooks.text_from_notebook(nbformat.reads(json.dumps(nb), 4)), \
        "an import does not write it into the text"
