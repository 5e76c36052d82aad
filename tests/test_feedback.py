"""The checks' feedback in Korean (labkit.course.feedback): the table has every message the checks can say and
nothing they no longer say, its fields fit, a message is matched to its own template, and the Checker shows the
translation beside a Korean badge while the score keeps the check's English."""

import pytest

from labkit.course import feedback, grading


def test_the_korean_table_is_in_step_with_the_checks():
    assert feedback.problems("ko") == [], "translate them in notebooks/ko/feedback.yml (python -m labkit.course.feedback)"


def test_templates_are_read_from_the_checks_own_returns(tmp_path):
    src = tmp_path / "checks.py"
    src.write_text('def a(lab, x):\n    if x:\n        return True, f"right: {x} is {x + 1}"\n'
                   '    return 0.5, "half"\n\ndef b(lab, y):\n    return False, f"{y}"\n'
                   'def c():\n    return "not a check", 1, 2\n')
    got = [t for t, _ in feedback.templates([str(src)])]
    assert got == list(feedback.EXTRA) + ["right: {} is {}", "half"]  # a bare field says nothing of its own


def test_a_message_is_filled_into_its_own_template():
    hostname = "it has its own UTS namespace, but its hostname is {}, not {}"
    table = feedback.read_table("ko")
    assert hostname in table
    text = hostname.format("'web1'", "'box1'")
    ko = feedback.translate(text, "ko")
    assert ko != text and "'web1'" in ko and "'box1'" in ko and "{" not in ko
    assert feedback.translate("no check ever says this", "ko") == "no check ever says this"
    assert feedback.translate(text, "en") == text


def test_the_most_specific_template_wins():
    """'... {} ...' templates can match each other's texts: the one with more words of its own is tried first."""
    texts = [t.replace("{}", "7") for t, _ in feedback.templates() if "{}" not in t]
    table = feedback.read_table("ko")
    for t in texts:  # a message with no fields comes back as exactly its own translation
        assert feedback.translate(t, "ko") == table[t].replace("{{", "{").replace("}}", "}"), t


def test_the_language_comes_from_the_checker_the_lab_command_or_the_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("LABKIT_LANG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert feedback.language() == "en" and feedback.language("ko") == "ko"
    (tmp_path / "ko").mkdir()
    monkeypatch.chdir(tmp_path / "ko")  # JupyterLab runs notebooks/ko/*.ipynb's kernel there
    assert feedback.language() == "ko"
    monkeypatch.setenv("LABKIT_LANG", "en")
    assert feedback.language() == "en"
    assert feedback.language("fr") == "en"  # no such edition: the checks' own English


def test_the_checker_shows_korean_and_keeps_the_english_score(capsys):
    said = "right: the target runs Linux 6.1.0-18-amd64. Every container you start there shares this kernel."
    checker = grading.Checker(None, "00-setup", "s1", lang="ko")
    shown = []
    real = grading._display
    try:
        grading._display = lambda score, refs=None, html=None, text=None, lang="en": shown.append(
            (score, html or grading._html(score, lang), text or grading._text(score, lang)))
        checker.check("00.1 kernel release", 1, lambda lab, answer: (True, said), "6.1.0-18-amd64")
        checker.check("00.2 cgroup mode", 1, lambda lab, answer: (False, "nothing like a template"), "v2")
        checker.summary()
    finally:
        grading._display = real
    (s1, h1, t1), (s2, h2, _), (total, h3, t3) = shown
    assert s1["feedback"] == said, "the grader reads the check's own words"
    assert "통과" in h1 and feedback.translate(said, "ko") in h1 and said not in h1 and "6.1.0-18-amd64" in h1
    assert "아직" in h2 and "nothing like a template" in h2  # no template: the English, as it was said
    assert "합계" in h3 and "문항" in h3 and total["feedback"] == "1 of 2 points"
    assert feedback.translate("1 of 2 points", "ko") in t3


@pytest.mark.parametrize("lang", feedback.LANGS)
def test_badge_words_cover_every_state(lang):
    assert set(grading.BADGES) | {"question", "points", "total"} <= set(feedback.WORDS[lang])


def test_a_students_feedback_page_is_in_the_edition_they_worked_in():
    """The grader's page for a student who worked in the Korean edition (metadata labkit.edition) is Korean; a
    metadata that says anything else, or is not even a mapping, gives the checks' English."""
    from labkit.course.grade import _edition, feedback_html
    said = "a new network namespace starts with nothing but a loopback interface: no way out until we add one."
    assert _edition({"metadata": {"labkit": {"edition": "ko"}}}) == "ko"
    for odd in ({"metadata": {"labkit": {"edition": "<script>"}}}, {"metadata": {"labkit": ["ko"]}},
                {"metadata": "ko"}, {}, []):
        assert _edition(odd) == "en", odd
    res = {"notebook": "02-namespaces", "questions": [{"question": "02.3 no network", "points": 1, "max_points": 1,
                                                       "feedback": said, "hidden": False}]}
    assert feedback.translate(said, "ko") in feedback_html("s1", [dict(res, lang="ko")])
    assert said in feedback_html("s1", [res])


def test_a_long_message_stays_english_and_costs_nothing():
    """A submission can make a check repeat a long value back (an odd answer's repr): matching it against
    templates of several fields costs time that grows fast with its length, so past MAX_TRANSLATED it is not
    matched at all (the grader writes every student's page; one such message must not stall it)."""
    t = "the target's kernel is not {}; ask the target (lab.run(['uname', '-r']))"
    long = t.format("x; " * 3000)
    assert len(long) > feedback.MAX_TRANSLATED and feedback.translate(long, "ko") == long
    short = t.format("6.1.0")
    assert feedback.translate(short, "ko") != short
