"""The course in other languages, from one source: ``notebooks/<lang>/NN-title.yml`` holds, for each prose
(markdown) cell of ``notebooks/NN-title.md`` by its cell id, the translated text and a digest of the English
text it was translated from; ``notebooks/<lang>/NN-title.ipynb`` is built from the English notebook with
those cells' text swapped in. Code cells, cell ids, tags and metadata are the English notebook's own, so an
edition runs, scores and is graded exactly as the English one (the checks are the same code).

The editions cannot drift: a prose cell whose English changed after it was translated, or that has no
translation, keeps its English text in the build, marked, and :func:`check` names it (CI runs it through
``python -m labkit.course.notebooks check``). ``skeleton`` starts or extends a table with the cells it
lacks, each with the English text and its digest, for a translator to replace.

Owns: translation tables and the translated editions. Host side (PyYAML, nbformat).
"""
import hashlib
import os

from ..wire.errors import InvalidSpec, NotFound
from . import NOTEBOOK_DIR

LANGS = ("ko",)
#: what a built edition shows in a cell whose translation is missing or stale
STALE = "> ⚠ 번역이 아직 없습니다 / not translated yet (the English text follows)\n\n"


def digest(text):
    """The digest of a prose cell's English text, as a table records it (12 hex digits of SHA-256)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def edition_dir(lang, source_dir=NOTEBOOK_DIR):
    if lang not in LANGS:
        raise InvalidSpec(f"there is no {lang!r} edition of the course", fix="use one of: en, " + ", ".join(LANGS))
    return os.path.join(source_dir, lang)


def table_path(stem, lang, source_dir=NOTEBOOK_DIR):
    return os.path.join(edition_dir(lang, source_dir), stem + ".yml")


def read_table(path):
    """A translation table: ``{cell id: {"en": digest, "ko": text}}`` (refused when it is not one)."""
    import yaml
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    cells = data.get("cells") if isinstance(data, dict) else None
    if not isinstance(cells, dict):
        raise InvalidSpec(f"{path} is not a translation table", fix="it maps 'cells' to {cell id: {en, <lang>}}")
    for cid, entry in cells.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("en"), str):
            raise InvalidSpec(f"{path}: cell {cid!r} is not {{en: digest, <lang>: text}}",
                              fix="run `python -m labkit.course.notebooks skeleton` to see the form")
    return cells


def translated(nb, cells, lang):
    """A copy of notebook ``nb`` with its prose cells in ``lang`` from ``cells``; and the ids of the cells
    left in English: ``(missing, stale)``."""
    import copy
    out = copy.deepcopy(nb)
    missing, stale = [], []
    for cell in out.cells:
        if cell.cell_type != "markdown":
            continue
        entry = cells.get(cell.id)
        text = entry.get(lang) if entry else None
        if not isinstance(text, str) or not text.strip():
            missing.append(cell.id)
            cell.source = STALE + cell.source
        elif entry["en"] != digest(cell.source):
            stale.append(cell.id)
            cell.source = STALE + cell.source
        else:
            cell.source = text.rstrip("\n")
    out.metadata["labkit"] = {**out.metadata.get("labkit", {}), "edition": lang}
    return out, missing, stale


def _dump(data):
    """YAML with every multi-line text as a literal block (a translator edits it as it reads)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)
    Dumper.add_representer(str, text)
    return yaml.dump(data, Dumper=Dumper, allow_unicode=True, sort_keys=False, width=1000)


def skeleton(nb, stem, lang, path):
    """Start (or extend) ``path``'s table: every prose cell of ``nb`` it lacks, with its digest, its English
    text (``english``, for the translator, who removes it) and no translation yet; entries already there are
    kept. The cell ids added."""
    cells = read_table(path) if os.path.exists(path) else {}
    added = []
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.id not in cells:
            cells[cell.id] = {"en": digest(cell.source), "english": cell.source + "\n", lang: None}
            added.append(cell.id)
    order = [c.id for c in nb.cells if c.id in cells] + [c for c in cells if c not in {x.id for x in nb.cells}]
    head = (f"# The {lang} edition of {stem}: each prose cell of notebooks/{stem}.md by its id. 'en' is the digest\n"
            f"# of the English text translated; when that text changes, `python -m labkit.course.notebooks check`\n"
            f"# names the cell until its translation is redone and 'en' set to the new digest.\n")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + _dump({"source": stem, "cells": {c: cells[c] for c in order}}))
    return added


def tables(lang, source_dir=NOTEBOOK_DIR):
    """``{stem: table path}`` of the notebooks that have a ``lang`` edition."""
    d = edition_dir(lang, source_dir)
    if not os.path.isdir(d):
        return {}
    return {fn[:-4]: os.path.join(d, fn) for fn in sorted(os.listdir(d)) if fn.endswith(".yml") and fn[:2].isdigit()}


def edition_text(english_ipynb_text, table, lang):
    """The edition's ``.ipynb`` text built from the English notebook's text, and (missing, stale)."""
    import nbformat
    from .notebooks import ipynb_text
    nb = nbformat.reads(english_ipynb_text, as_version=4)
    out, missing, stale = translated(nb, read_table(table), lang)
    return ipynb_text(out), missing, stale


def require(stem, source_dir=NOTEBOOK_DIR):
    path = os.path.join(source_dir, stem + ".ipynb")
    if not os.path.exists(path):
        raise NotFound(f"a translation names {stem}, which the course does not have", fix="remove the table")
    return path
