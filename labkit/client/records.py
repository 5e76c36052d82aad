"""Records: what a step did, as the client sees it, rendered for people (text and notebook HTML).

A record is the agent's answer: the steps that ran (commands with argv, syscalls with arguments, file
operations), their results and durations, and the facts they established. :class:`Record` gives it
attribute access and a faithful rendering: it shows only steps the agent reports having run.
Standard library only.
"""
import json


def step_text(step):
    kind = step.get("kind")
    if kind == "command":
        argv = " ".join(_q(a) for a in step.get("argv", []))
        return f"$ {argv}", f"exit {step.get('exit_code')}"
    if kind == "syscall":
        res = step.get("result")
        err = step.get("errno")
        return f"{step.get('call')}({', '.join(str(a) for a in step.get('args', []))})", \
            (f"-1 {err}" if err else f"= {res}")
    if kind == "file":
        return f"{step.get('op')} {step.get('path')}", step.get("detail", "")
    return json.dumps(step)[:200], ""


def _q(a):
    a = str(a)
    if a and all(c.isalnum() or c in "-_./=:,@%+" for c in a):
        return a
    return "'" + a.replace("'", "'\\''") + "'"


def record_digest(record):
    """The digest of what a record says the agent did and found (its ``steps`` and ``facts``, as canonical
    JSON), or None for something that is not a record. The grader's relay indexes every answer by it, so
    a record a notebook shows can be matched to the answer it came from (a hand-made one matches none)."""
    if not isinstance(record, dict) or not isinstance(record.get("steps"), list) or not record["steps"]:
        return None
    body = {"steps": record["steps"], "facts": record.get("facts") or {}}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    import hashlib
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Record(dict):
    """A dict with attribute access (``rec.facts``, ``rec.steps``, ``rec.stdout``) and rich display."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            facts = dict.get(self, "facts") or {}
            if key in facts:
                return facts[key]
            raise AttributeError(key) from None

    @property
    def steps(self):
        return self.get("steps", [])

    @property
    def facts(self):
        return self.get("facts", {})

    def text(self, max_steps=60):
        lines = [f"# {self.get('what', 'record')}  ({self.get('duration', 0) * 1000:.1f} ms)"]
        for s in self.steps[:max_steps]:
            what, res = step_text(s)
            lines.append(f"  {what}  ->  {res}")
        if len(self.steps) > max_steps:
            lines.append(f"  ... {len(self.steps) - max_steps} more steps")
        if self.get("stdout"):
            lines.append("stdout:\n" + self["stdout"].rstrip())
        if self.get("stderr"):
            lines.append("stderr:\n" + self["stderr"].rstrip())
        return "\n".join(lines)

    def __repr__(self):
        return self.text()

    def _repr_html_(self):
        import html  # (only a notebook shows HTML: the CLI does not pay for the import)
        rows = []
        for s in self.steps:
            what, res = step_text(s)
            dur = s.get("duration")
            rows.append(f"<tr><td>{html.escape(s.get('kind', ''))}</td><td style='text-align:left'>"
                        f"<code style='white-space:pre-wrap;word-break:break-all'>{html.escape(what)}</code></td>"
                        f"<td>{html.escape(str(res))}</td><td>{'' if dur is None else f'{dur * 1e3:.2f} ms'}</td></tr>")
        out = [f"<div class='labkit-record'><b>{html.escape(str(self.get('what', 'record')))}</b> "
               f"<small>({self.get('duration', 0) * 1000:.1f} ms)</small>",
               "<table><tr><th>kind</th><th>what ran</th><th>result</th><th>time</th></tr>", *rows, "</table>"]
        for key in ("stdout", "stderr"):
            if self.get(key):
                out.append(f"<b>{key}</b><pre>{html.escape(self[key])}</pre>")
        out.append("</div>")
        return "\n".join(out)


def html_table(rows, columns, title=None, status_key=None):
    import html
    colors = {"ok": "#d4edda", "warn": "#fff3cd", "missing": "#f8d7da"}
    out = [f"<b>{html.escape(title)}</b>" if title else "", "<table>",
           "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"]
    for r in rows:
        style = f" style='background:{colors.get(r.get(status_key), '')}'" if status_key else ""
        out.append(f"<tr{style}>" + "".join(f"<td style='text-align:left'>{html.escape(str(r.get(c, '')))}</td>"
                                            for c in columns) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def text_table(rows, columns):
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    widths = {c: min(w, 70) for c, w in widths.items()}
    line = lambda vals: "  ".join(str(v)[:widths[c]].ljust(widths[c]) for c, v in zip(columns, vals))  # noqa: E731
    out = [line(columns), line(["-" * widths[c] for c in columns])]
    out += [line([r.get(c, "") for c in columns]) for r in rows]
    return "\n".join(out)


class DoctorReport(Record):
    COLUMNS = ("check", "status", "value", "detail", "fix")

    @property
    def lines(self):
        return self.get("lines", [])

    def __getitem__(self, key):
        if isinstance(key, str) and key not in dict.keys(self):
            for line in dict.get(self, "lines", []):
                if line["check"] == key:
                    return line
        return dict.__getitem__(self, key)

    def text(self):
        return text_table(self.lines, self.COLUMNS)

    def _repr_html_(self):
        return html_table(self.lines, self.COLUMNS, title="labkit doctor", status_key="status")
