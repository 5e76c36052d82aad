"""The lecture's nginx walkthrough typed as the lecture types it (labkit.course.walkthrough), offline, against the
course's local registry: every step does what the lecture says, `exec -it` in a real pseudo-terminal edits the
page, nothing of it is left afterwards, and what a run stopped midway left does not stop the next one."""
import pytest

from labkit.course.walkthrough import nginx_walkthrough

pytestmark = pytest.mark.privileged


def test_the_walkthrough_does_what_the_lecture_says(lab):
    lab.build('FROM busybox\nCOPY index.html /var/www/index.html\nCMD ["httpd", "-f", "-p", "80", "-h", "/var/www"]\n',
              "t-walk/web:v1", context={"index.html": "<h1>Welcome</h1>"})
    try:
        with lab.registry(port=5055) as reg:
            # what a run stopped midway (a killed kernel) leaves: its container, holding the pulled image's name
            lab.tag("t-walk/web:v1", f"{reg.url}/course/web:v1")
            lab.create(f"{reg.url}/course/web:v1", name="lk-walk-t")
            done = nginx_walkthrough(lab, reg.url, image="t-walk/web:v1", name="lk-walk-t", port=8093)
    finally:
        if "lk-walk-t" in [c["name"] for c in lab.containers(all=True)]:  # (only when the walkthrough failed)
            lab.container("lk-walk-t").rm(force=True)
        for ref in [i["ref"] for i in lab.images() if i["ref"].startswith("127.0.0.1:5055/")]:
            lab.rmi(ref)
        lab.rmi("t-walk/web:v1")
        for n in lab.networks():
            if not n["members"] and n["spec"]["name"] == "default":
                lab.call("net.remove", name="default")
    steps = done["steps"]
    assert done["server"] == "busybox httpd" and [s for s in steps if not s["ok"]] == [], \
        "\n\n".join(str(s) for s in steps if not s["ok"])
    lectured = [s["lecture"].split()[1] if s["lecture"].startswith("docker") else s["lecture"] for s in steps]
    assert lectured[:6] == ["--version", "images", "search", "pull", "image", "ps"]
    assert "exec" in lectured and lectured[-1] == "rmi" and lectured.count("rmi") == 2
    edited = next(s for s in steps if s["lecture"] == "the page again")
    assert "edited with exec -it" in edited["output"]
    refused = [s for s in steps if s["lecture"].startswith("docker rmi")][0]
    assert refused["exit_code"] != 0 and "lk-walk-t (exited)" in refused["output"]
    assert "lk-walk-t" not in [c["name"] for c in lab.containers(all=True)]
    assert not any(i["ref"].startswith("127.0.0.1:5055/") for i in lab.images())
