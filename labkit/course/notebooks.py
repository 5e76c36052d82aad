"""The course's notebooks as reviewable source: ``notebooks/NN-title.md`` is what people edit, and
``notebooks/NN-title.ipynb`` is built from it.

The text is jupytext's markdown format, paired with the notebook (``formats: ipynb,md`` in both
headers), so opening either file in a JupyterLab with jupytext edits the pair. jupytext does not keep
nbformat's cell ids, and grading finds its check cells by id, so every cell carries its id in the
text as cell metadata (```` ```python id="00-01" ```` on a code fence, ``<!-- #region id="00-00" -->``
around prose); :func:`notebook_from_text` moves it to ``cell.id`` and refuses a cell without one or an
id used twice. The build is deterministic: the same text gives the same bytes (nbformat's JSON, indent 1,
a trailing newline, outputs empty), which is what ``check`` compares the committed notebooks with.
The build also marks where slides begin (:func:`slide_type`), so every notebook is its own slide deck, and
builds the translated editions (``notebooks/<lang>/``, :mod:`labkit.course.translate`).

``python -m labkit.course.notebooks build [NAME ...]`` writes the notebooks from their texts;
``check`` exits 1 naming every notebook that differs from what its text builds, every text or
notebook without its pair and every translated cell missing or made from an older English text; ``skeleton
--lang ko NAME`` starts a translation table; ``import NAME ...`` writes a text from a notebook that was made or edited
without jupytext (once: the text is the source afterwards).

Owns: the text <-> notebook conversion and the pairing of the two files. Host side (jupytext,
nbformat); the notebooks' content is the course's, and :mod:`labkit.course.assign` keeps reading the
built ``.ipynb``.
"""
import argparse
import os
import re
import sys
import tempfile

from ..wire.errors import InvalidSpec, LabkitError, NotFound
from .runbook import NOTEBOOK_DIR

TEXT_EXT = ".md"
FORMATS = "ipynb,md"
# The text keeps the notebook's language_info (jupytext leaves it out by default) and not the version of
# jupytext that last wrote it (a JupyterLab save would otherwise change a header line for nothing).
METADATA_FILTER = "language_info,-jupytext.text_representation.jupytext_version"
ID_KEY = "id"  # the cell metadata key that carries cell.id in the text
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # nbformat 4.5's cell id
_NAME_RE = re.compile(r"^\d\d-.+$")


def _jupytext():
    try:
        import jupytext
    except ImportError as exc:  # pragma: no cover - jupytext is a declared dependency
        raise NotFound("jupytext is not installed",
                       fix="install labkit's dependencies (`pip install -e .` or environment.yml), "
                           "or `pip install jupytext`") from exc
    return jupytext


def _where(name, index, cell):
    first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
    return f"{name}: cell {index} ({cell.cell_type}, {first[:60]!r})"


def notebook_from_text(text, name="<text>"):
    """The notebook (an nbformat ``NotebookNode``, v4.5, outputs empty) that ``text`` describes.

    Each cell's ``id`` metadata becomes its ``cell.id``; a cell without one, with one nbformat refuses,
    or with one an earlier cell has raises :class:`InvalidSpec`."""
    import nbformat
    src = _jupytext().reads(text, fmt="md")
    cells, seen = [], {}
    for i, cell in enumerate(src.cells):
        meta = dict(cell.metadata)
        cid = meta.pop(ID_KEY, None)
        if cid is None:
            fence = ("```python id=\"...\"" if cell.cell_type == "code"
                     else "<!-- #region id=\"...\" --> ... <!-- #endregion -->")
            raise InvalidSpec(f"{_where(name, i, cell)} has no id",
                              fix=f"give the cell an id no other cell of the notebook has: {fence}")
        if not isinstance(cid, str) or not _ID_RE.match(cid):
            raise InvalidSpec(f"{_where(name, i, cell)} has the id {cid!r}, which nbformat refuses",
                              fix="use 1 to 64 letters, digits, '-' or '_'")
        if cid in seen:
            raise InvalidSpec(f"{_where(name, i, cell)} has the id {cid!r} of cell {seen[cid]}",
                              fix="give one of them a new id (grading finds check cells by id: keep the old "
                                  "one on the cell it belonged to)")
        seen[cid] = i
        slide = slide_type(cell.cell_type, cell.source)
        if slide and "slideshow" not in meta:
            meta["slideshow"] = {"slide_type": slide}
        if cell.cell_type == "code":
            new = nbformat.v4.new_code_cell(source=cell.source, metadata=meta)
        elif cell.cell_type == "markdown":
            new = nbformat.v4.new_markdown_cell(source=cell.source, metadata=meta)
        else:
            new = nbformat.v4.new_raw_cell(source=cell.source, metadata=meta)
        new.id = cid
        cells.append(new)
    meta = dict(src.metadata)
    jt = dict(meta.get("jupytext", {}))
    jt.pop("text_representation", None)  # says how the text is written; the notebook is not that text
    if jt:
        meta["jupytext"] = jt
    else:
        meta.pop("jupytext", None)
    return nbformat.v4.new_notebook(cells=cells, metadata=meta, nbformat=4, nbformat_minor=5)


def slide_type(cell_type, source):
    """The slide a cell starts when the notebook is shown as slides (RISE, JupyterLab's presentation mode):
    a new slide at each ``#``/``##`` heading, a sub-slide (below it) at each ``###``, else None (the cell goes
    on the slide before it). Written into the built notebook's cell metadata; a cell's own ``slideshow``
    metadata in the text wins."""
    if cell_type != "markdown":
        return None
    source = "".join(source) if isinstance(source, list) else source
    first = next((ln for ln in source.splitlines() if ln.strip()), "")
    if re.match(r"#{1,2} ", first):
        return "slide"
    if first.startswith("### "):
        return "subslide"
    return None


def ipynb_text(nb):
    """The committed form of notebook ``nb``: nbformat's JSON (sorted keys, indent 1) and a newline."""
    import nbformat
    return nbformat.writes(nb, version=4) + "\n"


def build_text(text, name="<text>"):
    """The ``.ipynb`` file's text that ``text`` builds (same input, same bytes)."""
    return ipynb_text(notebook_from_text(text, name))


def text_from_notebook(nb):
    """The source text of notebook ``nb`` (ids into cell metadata, the pairing in its header)."""
    import nbformat
    nb = nbformat.from_dict(nb)
    missing = [i for i, cell in enumerate(nb.cells) if not cell.get("id")]
    if missing:
        raise InvalidSpec(f"cells {missing} of the notebook have no id (nbformat {nb.nbformat}.{nb.nbformat_minor})",
                          fix="give every cell an id: save it once from JupyterLab 3 or newer (nbformat 4.5), "
                              "keeping the ids grading knows")
    cells = []
    for cell in nb.cells:
        cell = nbformat.from_dict(dict(cell))
        derived = slide_type(cell.cell_type, cell.source)
        cell.metadata = {ID_KEY: cell.id, **{k: v for k, v in cell.metadata.items() if k != ID_KEY and not (
            k == "slideshow" and v == {"slide_type": derived})}}  # the build derives it again
        cells.append(cell)
    meta = dict(nb.metadata)
    meta["jupytext"] = {**meta.get("jupytext", {}), "formats": FORMATS, "notebook_metadata_filter": METADATA_FILTER}
    out = nbformat.v4.new_notebook(cells=cells, metadata=meta, nbformat=4, nbformat_minor=nb.nbformat_minor)
    return _jupytext().writes(out, fmt="md")


# -- the files ---------------------------------------------------------------------------------------------

def pairs(source_dir=NOTEBOOK_DIR):
    """``{stem: (text path or None, notebook path or None)}`` for every ``NN-title`` text or notebook."""
    found = {}
    for fn in sorted(os.listdir(source_dir)):
        stem, ext = os.path.splitext(fn)
        if _NAME_RE.match(stem) and ext in (TEXT_EXT, ".ipynb"):
            text, ipynb = found.get(stem, (None, None))
            path = os.path.join(source_dir, fn)
            found[stem] = (path, ipynb) if ext == TEXT_EXT else (text, path)
    return found


def _read(path):
    with open(path, encoding="utf-8") as f:  # universal newlines: a CRLF checkout builds the same bytes
        return f.read()


def _write(path, text):
    """Write ``text`` (LF, UTF-8) to ``path`` through a temporary file in the same folder."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".nb-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _stems(names, found, source_dir):
    if not names:
        return sorted(found)
    stems = []
    for n in names:
        stem = os.path.splitext(os.path.basename(n))[0]
        if stem not in found:
            raise NotFound(f"no notebook or text named {n!r} in {source_dir}",
                           fix="name one of: " + ", ".join(sorted(found)))
        stems.append(stem)
    return stems


def build(names=None, source_dir=NOTEBOOK_DIR):
    """Write ``NN-title.ipynb`` from ``NN-title.md`` for every text (or the ``names`` given); a list of
    the notebooks whose bytes changed. A notebook left unchanged is not rewritten; a built notebook is
    never newer than its text (jupytext in JupyterLab would take the text for outdated)."""
    found = pairs(source_dir)
    changed = []
    for stem in _stems(names, found, source_dir):
        text_path = found[stem][0]
        if text_path is None:
            raise NotFound(f"{stem}.ipynb has no text {stem}{TEXT_EXT} to build it from",
                           fix=f"make the text once with `python -m labkit.course.notebooks import {stem}`")
        ipynb_path = os.path.join(source_dir, stem + ".ipynb")
        want = build_text(_read(text_path), os.path.basename(text_path))
        have = _read_bytes(ipynb_path)
        if have != want.encode("utf-8"):
            _write(ipynb_path, want)
            changed.append(ipynb_path)
        text_mtime = os.stat(text_path).st_mtime_ns
        if os.stat(ipynb_path).st_mtime_ns > text_mtime:
            os.utime(ipynb_path, ns=(os.stat(ipynb_path).st_atime_ns, text_mtime))
    return changed + build_editions(names, source_dir)


def build_editions(names=None, source_dir=NOTEBOOK_DIR):
    """Write each translated edition (:mod:`labkit.course.translate`) of the notebooks named (or all) from the
    English notebook and its table; the notebooks whose bytes changed."""
    from . import translate
    changed = []
    stems = {os.path.splitext(os.path.basename(n))[0] for n in names} if names else None
    for lang in translate.LANGS:
        for stem, table in translate.tables(lang, source_dir).items():
            if stems is not None and stem not in stems:
                continue
            want, _, _ = translate.edition_text(_read(translate.require(stem, source_dir)), table, lang)
            path = os.path.join(translate.edition_dir(lang, source_dir), stem + ".ipynb")
            if _read_bytes(path) != want.encode("utf-8"):
                _write(path, want)
                changed.append(path)
    return changed


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def check(source_dir=NOTEBOOK_DIR):
    """What is wrong with the committed pairs: a list of ``(path, problem)``, empty when every notebook
    is exactly what its text builds."""
    problems = []
    for stem, (text_path, ipynb_path) in sorted(pairs(source_dir).items()):
        if text_path is None:
            problems.append((ipynb_path, f"has no text {stem}{TEXT_EXT} (the source it is built from)"))
            continue
        if ipynb_path is None:
            problems.append((text_path, f"has no notebook {stem}.ipynb built from it"))
            continue
        try:
            want = build_text(_read(text_path), os.path.basename(text_path)).encode("utf-8")
        except LabkitError as exc:
            problems.append((text_path, f"does not build: {exc.message}"))
            continue
        if _read_bytes(ipynb_path) != want:
            problems.append((ipynb_path, f"is not what {stem}{TEXT_EXT} builds"))
    return problems + _edition_problems(source_dir)


def _edition_problems(source_dir):
    """Each translated edition: built from its table and the English notebook as committed, with every prose
    cell translated from the English text that is there now."""
    from . import translate
    problems = []
    for lang in translate.LANGS:
        d = translate.edition_dir(lang, source_dir)
        found = translate.tables(lang, source_dir)
        for fn in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if fn.endswith(".ipynb") and fn[:-6] not in found:
                problems.append((os.path.join(d, fn), "has no translation table to be built from"))
        for stem, table in found.items():
            try:
                want, missing, stale = translate.edition_text(_read(translate.require(stem, source_dir)), table,
                                                              lang)
            except LabkitError as exc:
                problems.append((table, f"does not build: {exc.message}"))
                continue
            if missing:
                problems.append((table, f"lacks the cells {', '.join(missing)}: translate them (`python -m "
                                        f"labkit.course.notebooks skeleton --lang {lang} {stem}` adds them)"))
            if stale:
                problems.append((table, f"translates an older English text of the cells {', '.join(stale)}: "
                                        "translate them again and set 'en' to the digest skeleton shows"))
            if _read_bytes(os.path.join(d, stem + ".ipynb")) != want.encode("utf-8"):
                problems.append((os.path.join(d, stem + ".ipynb"), f"is not what {stem}.yml builds"))
    return problems


def import_notebooks(names, source_dir=NOTEBOOK_DIR, force=False):
    """Write ``NN-title.md`` from ``NN-title.ipynb`` for each of ``names``; the texts written."""
    import nbformat
    found = pairs(source_dir)
    written = []
    for stem in _stems(names, found, source_dir):
        text_path, ipynb_path = found[stem]
        if ipynb_path is None:
            raise NotFound(f"no notebook {stem}.ipynb to import", fix="name a notebook in " + source_dir)
        if text_path is not None and not force:
            raise InvalidSpec(f"{text_path} exists: it is the source, and importing would overwrite it",
                              fix="edit the text instead, or pass --force to replace it with the notebook's cells")
        nb = nbformat.reads(_read(ipynb_path), as_version=4)
        text_path = os.path.join(source_dir, stem + TEXT_EXT)
        _write(text_path, text_from_notebook(nb))
        written.append(text_path)
    return written


def main(argv=None):
    """``python -m labkit.course.notebooks build|check|import``; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m labkit.course.notebooks",
                                 description="Build the course notebooks (.ipynb) from their texts (.md).")
    ap.add_argument("--dir", default=NOTEBOOK_DIR, help="the notebooks folder (default: the course's)")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write NN-title.ipynb from NN-title.md (all, or the names given)")
    b.add_argument("names", nargs="*")
    sub.add_parser("check", help="exit 1 naming each notebook that is not what its text builds")
    i = sub.add_parser("import", help="write NN-title.md from NN-title.ipynb (a notebook edited without jupytext)")
    i.add_argument("names", nargs="+")
    i.add_argument("--force", action="store_true", help="replace an existing text")
    s = sub.add_parser("skeleton", help="start or extend <lang>/NN-title.yml: each prose cell it lacks, in English")
    s.add_argument("--lang", default="ko")
    s.add_argument("names", nargs="+")
    args = ap.parse_args(argv)
    try:
        if args.command == "skeleton":
            import nbformat
            from . import translate
            for stem in _stems(args.names, pairs(args.dir), args.dir):
                nb = nbformat.reads(_read(translate.require(stem, args.dir)), as_version=4)
                path = translate.table_path(stem, args.lang, args.dir)
                added = translate.skeleton(nb, stem, args.lang, path)
                print(f"{os.path.relpath(path)}: {len(added)} cells added")
            return 0
        if args.command == "build":
            changed = build(args.names, args.dir)
            for path in changed:
                print(f"built {os.path.relpath(path)}")
            if not changed:
                print("every notebook is what its text builds")
            return 0
        if args.command == "check":
            problems = check(args.dir)
            for path, problem in problems:
                print(f"{os.path.relpath(path)}: {problem}", file=sys.stderr)
            if problems:
                print("fix: edit the .md, then run `python -m labkit.course.notebooks build` (a notebook without "
                      "its text: `python -m labkit.course.notebooks import NN-title` once)", file=sys.stderr)
                return 1
            return 0
        for path in import_notebooks(args.names, args.dir, force=args.force):
            print(f"wrote {os.path.relpath(path)}")
        return 0
    except LabkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
