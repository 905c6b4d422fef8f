import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from parity import ParityFixture, parity_fixture

HOST_SUITES = ("test_host_", "test_browser_")
"""Test files that need ComfyUI (and, for the browser ones, Chromium); they skip on a contributor's machine."""
PINNED, NEWEST = "pinned", "newest"


@pytest.fixture(scope="session")
def oracle() -> ParityFixture:
    return parity_fixture()


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models gain nothing from intra-op threads, and lose much when the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "host_feature(name, present): a test of a feature ComfyUI gained after the "
                                       "oldest supported release; not run where the host lacks it (named in the "
                                       "summary), so nothing is skipped on a host that has it")


def pytest_collection_modifyitems(config, items) -> None:
    lacking = [item for item in items
               if (marker := item.get_closest_marker("host_feature")) is not None and not marker.args[1]]
    if lacking:
        config.hook.pytest_deselected(items=lacking)
        items[:] = [item for item in items if item not in lacking]
    config.xpsr_features_lacking = Counter(item.get_closest_marker("host_feature").args[0] for item in lacking)


@pytest.fixture(scope="module", params=[PINNED, NEWEST])
def frontend(request) -> str:
    """The frontend a browser test's server serves: the one ComfyUI pins, or the newest (XPSR_NEWEST_FRONTEND)."""
    return request.param


@pytest.fixture(scope="module")
def front_end_root(frontend) -> Path | None:
    """The build the server serves instead of the pinned one (None: the pinned one)."""
    if frontend == PINNED:
        return None
    if not os.environ.get("XPSR_NEWEST_FRONTEND"):
        pytest.skip("XPSR_NEWEST_FRONTEND is not set: it names the newest frontend's build directory "
                    "(comfyui_frontend_package/static)")
    return Path(os.environ["XPSR_NEWEST_FRONTEND"])


def _host_skips(session) -> list:
    stats = session.config.pluginmanager.get_plugin("terminalreporter").stats
    return [r for r in stats.get("skipped", []) if os.path.basename(r.fspath).startswith(HOST_SUITES)]


def pytest_sessionfinish(session, exitstatus) -> None:
    """With XPSR_REQUIRE_HOST=1 (CI), a host or browser test that skipped did not run: the run fails."""
    if os.environ.get("XPSR_REQUIRE_HOST") == "1":
        session.config.xpsr_host_skips = _host_skips(session)
        if session.config.xpsr_host_skips and exitstatus == 0:
            session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    for feature, count in getattr(config, "xpsr_features_lacking", {}).items():
        terminalreporter.write_line(f"{count} tests of {feature} not run: this ComfyUI host lacks it")
    skips = getattr(config, "xpsr_host_skips", [])
    if skips:
        terminalreporter.section(f"{len(skips)} host or browser tests skipped while XPSR_REQUIRE_HOST=1: failed",
                                 red=True)
        for report in skips:
            reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
            terminalreporter.write_line(f"{report.nodeid}: {reason}")
