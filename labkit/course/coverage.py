"""Which lecture topic each notebook teaches, and how: the coverage table, read from the notebooks' own tags.

A code cell of ``notebooks/NN-title.md`` carries ``lecture:<topic>`` tags (one per topic of :data:`TOPICS` it
teaches). What kind of teaching it is comes from the cell itself: a ``check`` cell checks, a cell with a solution
block (``### BEGIN SOLUTION``) is an exercise, a cell that draws (``plotting.``, ``.chart(``, ``.show()`` of a
step sequence) is a picture, any other code cell a demo. :func:`table` renders the README's coverage table;
``python -m labkit.course.coverage`` prints it and tests/test_coverage.py keeps the README's copy and the tags
in step (and every topic taught by doing or drawing).
"""
import json
import os
import re

from . import NOTEBOOK_DIR

#: the lecture's topics in its order: (tag, the lecture's section, what it is about); ``act``: a student can act
#: on it (then an exercise with its check is expected)
TOPICS = [
    ("packaging", "컨테이너 · 패키징 기술", "containers as sandboxed packaging: standard, portable, light, secure", True),
    ("virt-vs-containers", "가상화 vs 컨테이너", "a guest OS per VM on a hypervisor vs one shared kernel", True),
    ("history", "컨테이너 기술의 역사", "chroot, Jail, VServer, zones, OpenVZ, cgroups, LXC, Docker, Kubernetes", True),
    ("security", "컨테이너 기술의 역사 (보안 이슈)", "container security issues: Dirty COW, one shared kernel", True),
    ("oci", "컨테이너 기술의 역사 (OCI)", "OCI's image and runtime specs, and the runtimes (runc, crun, containerd, CRI-O)",
     False),
    ("containers-vs-vms", "컨테이너 vs 가상머신", "what isolation costs: start-up, speed, memory per instance", True),
    ("when-containers", "컨테이너가 유리한 경우", "microservices, fewer servers, cloud native, dev like prod", False),
    ("when-vms", "가상머신이 유리한 경우", "monoliths, other operating systems, fixed storage, full OS features", False),
    ("docker-architecture", "구동 방식 · 도커 아키텍처", "a client talking REST to a daemon that does the work", True),
    ("docker-components", "구조와 관련된 주요 컴포넌트", "daemon, client, registry, images, containers", True),
    ("docker-run", "도커 클라이언트가 도커 데몬에 보내는 명령 수행과정", "the six steps behind docker run -i -t", True),
    ("deployment", "도커 기반 서비스가 배포될 때 관여되는 주요 컴포넌트",
     "infrastructure, host OS, nodes, Swarm managers and workers, services, stacks", True),
    ("union-fs", "도커 기반 기술", "union file systems and image layers, commit, often-changed layers on top", True),
    ("install", "설치해보기", "setting up: the engine on a machine of one's own", False),
    ("tutorial", "튜토리얼 진행해보기", "the getting-started tutorial: build, run, share an image", True),
    ("commands", "도커 명령어 실행해보기", "docker's commands: images, ps -a, version", True),
    ("nginx", "nginx 띄워보기", "the nginx walkthrough: create -p, start, logs, top, inspect, exec -it, stop, rmi, rm", True),
]
TOPIC_TAGS = {t[0] for t in TOPICS}
KINDS = ("demo", "picture", "exercise", "check")
_FENCE = re.compile(r'^```python id="([^"]+)"(?: tags=(\[[^\]]*\]))?\s*$')


def cells(path):
    """[(cell id, tags, source)] of the code cells of one notebook source (jupytext markdown)."""
    out, cur = [], None
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = _FENCE.match(line.rstrip("\n"))
            if cur is None and m:
                cur = (m.group(1), json.loads(m.group(2) or "[]"), [])
            elif cur is not None and line.startswith("```"):
                out.append((cur[0], cur[1], "".join(cur[2])))
                cur = None
            elif cur is not None:
                cur[2].append(line)
    return out


def kind(tags, source):
    if "check" in tags:
        return "check"
    if "### BEGIN SOLUTION" in source:
        return "exercise"
    if "plotting." in source or ".chart(" in source or "_chart(" in source or ".show()" in source:
        return "picture"
    return "demo"


def coverage(source_dir=NOTEBOOK_DIR):
    """{topic: {kind: [notebook number, ...]}} from the tags; unknown ``lecture:`` tags raise ValueError."""
    out = {t[0]: {k: [] for k in KINDS} for t in TOPICS}
    for name in sorted(os.listdir(source_dir)):
        if not (name.endswith(".md") and name[:2].isdigit()):
            continue
        for cid, tags, src in cells(os.path.join(source_dir, name)):
            for tag in tags:
                if not tag.startswith("lecture:"):
                    continue
                topic = tag[len("lecture:"):]
                if topic not in TOPIC_TAGS:
                    raise ValueError(f"{name}, cell {cid}: unknown lecture topic {topic!r} (see coverage.TOPICS)")
                where = out[topic][kind(tags, src)]
                if name[:2] not in where:
                    where.append(name[:2])
    return out


def gaps(cov=None):
    """Topics taught neither by a demo nor by a picture, and topics a student can act on with no exercise or
    no check: [(topic, what is missing)]."""
    cov = cov or coverage()
    out = []
    for tag, _, _, act in TOPICS:
        c = cov[tag]
        if not c["demo"] and not c["picture"]:
            out.append((tag, "a demo or a picture"))
        if act and not c["exercise"]:
            out.append((tag, "an exercise"))
        if act and not c["check"]:
            out.append((tag, "a check"))
    return out


def table(cov=None):
    """The README's coverage table (markdown): a row per lecture topic, the notebooks that teach it by kind."""
    cov = cov or coverage()
    lines = ["| lecture topic | the lecture's section | demo | picture | exercise | check |",
             "|---|---|---|---|---|---|"]
    for tag, section, about, _ in TOPICS:
        cells_ = [", ".join(cov[tag][k]) or "—" for k in KINDS]
        lines.append(f"| {about} | {section} | " + " | ".join(cells_) + " |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- coverage table: python -m labkit.course.coverage -->", "<!-- end of coverage table -->"


def between(text, begin, end):
    """What ``text`` holds between the markers ``begin`` and ``end`` (None without them): a generated table."""
    i, j = text.find(begin), text.find(end)
    return None if i < 0 or j < i else text[i + len(begin):j].strip("\n") + "\n"


def readme_block(readme_text):
    """The table between the README's markers (None without them)."""
    return between(readme_text, BEGIN, END)


if __name__ == "__main__":
    print(table(), end="")
