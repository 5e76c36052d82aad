"""The checks' feedback in the student's language: what a check says, in the edition the student reads.

A check (:mod:`labkit.course.checks`) answers in English, and the score the grader reads keeps that English.
What the student sees beside the badge is translated here: :func:`templates` reads every message the checks
can return straight from their source (each literal or f-string a check returns beside its points, the
f-string's fields as ``{}``), and ``notebooks/<lang>/feedback.yml`` gives each template's translation, its
fields as ``{0}``, ``{1}``, ... in the order the English has them. :func:`translate` matches a message against
the templates (the most specific first) and fills the translation in; a message with no template (one a check
builds from parts) stays English. tests/test_feedback.py keeps the table and the checks in step, as
``notebooks check`` does for the prose.

The language: the Checker's own ``lang``, else ``LABKIT_LANG`` (``labkit lab --lang ko`` sets it for its
kernels), else the folder the kernel runs in (JupyterLab runs a notebook's kernel in the notebook's folder:
``notebooks/ko``).
"""
import ast
import functools
import os
import re

from . import NOTEBOOK_DIR

HERE = os.path.dirname(os.path.abspath(__file__))
#: where the messages are: the checks, and the Checker's own (a check that could not run)
SOURCES = (os.path.join(HERE, "checks.py"), os.path.join(HERE, "grading.py"))
#: messages that are not returned beside points: an unanswered question, the total under the score table
EXTRA = ("not answered yet: replace the ... / None in the exercise cell and run it again", "{} of {} points")
LANGS = ("ko",)
#: the score's own words in each language: the badges (PASS, PARTIAL, NOT YET in English) and the score table's
WORDS = {"ko": {"pass": "통과", "partial": "부분 점수", "fail": "아직", "question": "문항", "points": "점수",
                "total": "합계"}}
FIELD = "{}"
#: the longest message translated: a check's own words are short, and a message that carries a long value (a
#: submission's odd answer, repeated back) is left in English rather than matched at a cost that grows with it
MAX_TRANSLATED = 2000


def edition_of(folder):
    """The language of the edition a folder holds: its name when that is one of :data:`LANGS` (notebooks/ko),
    else 'en'."""
    name = os.path.basename(os.path.normpath(folder))
    return name if name in LANGS else "en"


def language(lang=None):
    """The language feedback is shown in: ``lang``, else LABKIT_LANG, else the edition of the kernel's folder."""
    lang = lang or os.environ.get("LABKIT_LANG") or edition_of(os.getcwd())
    return lang if lang in LANGS else "en"


def _template(node):
    """The English template of a message node (a string literal or an f-string), or None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant) and isinstance(v.value, str):
                parts.append(v.value)
            elif isinstance(v, ast.FormattedValue):
                parts.append(FIELD)
            else:
                return None
        return "".join(parts)
    return None


def templates(paths=SOURCES):
    """Every message a check returns beside its points, as a template, and :data:`EXTRA`: [(template, where)],
    in source order, each once. A template that is nothing but fields (it says nothing of its own) is left out."""
    out, seen = [(t, "extra") for t in EXTRA], set(EXTRA)
    for path in paths:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) and len(node.value.elts) == 2:
                t = _template(node.value.elts[1])
                if t is not None and t.replace(FIELD, "").strip() and t not in seen:
                    seen.add(t)
                    found.append((node.lineno, t))
        out += [(t, f"{os.path.basename(path)}:{line}") for line, t in sorted(found)]
    return out


def _pattern(template):
    return re.compile("(.*?)".join(re.escape(p) for p in template.split(FIELD)), re.S)


def table_path(lang, source_dir=NOTEBOOK_DIR):
    return os.path.join(source_dir, lang, "feedback.yml")


def read_table(lang, source_dir=NOTEBOOK_DIR):
    """{English template: translation} of ``notebooks/<lang>/feedback.yml`` (ValueError when malformed)."""
    import yaml
    with open(table_path(lang, source_dir), encoding="utf-8") as f:
        data = yaml.safe_load(f)
    rows = data.get("feedback") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("en"), str)
                                             and isinstance(r.get(lang), str) for r in rows):
        raise ValueError(f"{table_path(lang, source_dir)}: not a feedback table (feedback: a list of "
                         f"{{en: ..., {lang}: ...}})")
    return {r["en"]: r[lang] for r in rows}


@functools.lru_cache(maxsize=None)
def _compiled(lang):
    table = read_table(lang)
    # the most specific first: more of its own words, then fewer fields
    order = sorted(table, key=lambda t: (-len(t.replace(FIELD, "")), t.count(FIELD)))
    return [(_pattern(t), table[t]) for t in order]


def translate(text, lang):
    """``text`` (a check's English feedback) in ``lang``; unchanged for English, or when no template fits."""
    if lang == "en" or not isinstance(text, str) or len(text) > MAX_TRANSLATED:
        return text
    try:
        compiled = _compiled(lang)
    except Exception:  # noqa: BLE001 - a missing or broken table (OSError, YAMLError, ...) leaves the English
        return text
    for pattern, target in compiled:
        m = pattern.fullmatch(text)
        if m:
            try:
                return target.format(*m.groups())
            except (IndexError, KeyError, ValueError):
                return text
    return text


def problems(lang, source_dir=NOTEBOOK_DIR, paths=SOURCES):
    """What keeps the table and the checks out of step: templates with no translation, translations of
    templates the checks no longer have, and translations whose fields do not fit ({0}.. for each {})."""
    table = read_table(lang, source_dir)
    have = {t for t, _ in templates(paths)}
    out = [f"{where}: no {lang} translation for {t!r}" for t, where in templates(paths) if t not in table]
    out += [f"a translation of a message the checks no longer have: {t!r}" for t in table if t not in have]
    for t, target in table.items():
        n = t.count(FIELD)
        used = {int(i) for i in re.findall(r"\{(\d+)\}", target)}
        if re.search(r"\{(?!\d+\})", target.replace("{{", "").replace("}}", "")) or not used <= set(range(n)):
            out.append(f"the translation of {t!r} uses fields other than {{0}}..{{{n - 1}}}: {target!r}")
    return out


if __name__ == "__main__":  # the templates, for a translator: python -m labkit.course.feedback
    for t, where in templates():
        print(f"{where}: {t}")
