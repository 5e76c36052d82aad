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
