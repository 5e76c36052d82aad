"""The one chart style, on a screen and on the lecture's projector (big_screen). Fast, no root."""
import pytest

from labkit.course import plotting


@pytest.fixture
def normal_screen():
    yield
    plotting._SCREEN["big"] = False
    plotting._plt()


def test_big_screen_makes_every_chart_larger_and_thicker_and_goes_back(normal_screen, capsys):
    plt = plotting._plt()
    small = plt.rcParams["axes.titlesize"], plt.rcParams["lines.linewidth"]
    plotting.big_screen()
    assert plotting.is_big_screen()
    plt = plotting._plt()
    assert plt.rcParams["axes.titlesize"] > 1.5 * small[0] and plt.rcParams["lines.linewidth"] >= 2 * small[1]
    fig = plotting.cpu_use_chart(__import__("pandas").DataFrame({"t": [0.0, 1.0, 2.0],
                                                                 "cpu_usage_us": [0, 250_000, 500_000]}), 0.25)
    assert fig.axes[0].title.get_fontsize() == plt.rcParams["axes.titlesize"], "drawn in the big style"
    assert plotting.live_fonts()["width"] == "720px", "the live charts too"
    plotting.big_screen(False)
    assert plotting._plt().rcParams["axes.titlesize"] == small[0]


def test_the_big_screen_style_sheet_covers_the_notebook_and_labkits_widgets():
    for selector in ("--jp-content-font-size1", "--jp-code-font-size", ".labkit-steps", ".labkit-live"):
        assert selector in plotting.BIG_SCREEN_CSS


def test_the_lectures_pictures_are_drawn_from_facts():
    """The history timeline names the lab that rebuilds each step; the two stacks colour each box by whose kernel it
    is (boot id), so containers share the host's colour and a VM's guest kernel has its own."""
    from labkit.course import plotting
    fig = plotting.history_timeline()
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "chroot" in texts and "lab 01" in texts and "Kubernetes" in texts and "lab 09" in texts
    facts = {"host_kernel": "6.1", "host_boot": "a" * 36, "containers": [("web", "a" * 36)],
             "vm": {"kernel": "6.1", "boot": "b" * 36, "accel": "tcg"}}
    ax = plotting.two_stacks(facts).axes[0]
    by_text = {t.get_text().split("\n")[0]: t for t in ax.texts}
    assert "hypervisor: qemu (TCG)" in by_text
    colour = {p.get_facecolor() for p in ax.patches}
    host_fc = [p.get_facecolor() for p, t in zip(ax.patches, ax.texts) if t.get_text().startswith("host kernel")]
    web_fc = [p.get_facecolor() for p, t in zip(ax.patches, ax.texts) if t.get_text().startswith("web")]
    guest_fc = [p.get_facecolor() for p, t in zip(ax.patches, ax.texts) if t.get_text().startswith("guest kernel")]
    assert web_fc[0] == host_fc[0] != guest_fc[0] and len(colour) >= 4
