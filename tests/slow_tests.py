"""Which tests a run leaves out: those marked ``slow`` (more models, modes and process set-ups of capabilities the
quick tests already cover), unless the run asks for them.  A run asks by a marker expression (``-m slow``,
``-m "slow or not slow"``: pytest's own selection then decides), by naming a test (``FILE::TEST``), or with
``RUN_SLOW_TESTS=1`` (the README's command then runs quick and slow tests in one session).  The summary counts what
was left out.
"""
import os

import pytest

ENV = "RUN_SLOW_TESTS"


def wanted(config: pytest.Config) -> bool:
    """Whether this run keeps the slow tests."""
    return os.environ.get(ENV) == "1" or bool(config.option.markexpr)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if wanted(config):
        return
    named = [a.split("::", 1) for a in config.args if "::" in a]  # FILE::TEST[...], the file as given
    left = [i for i in items if i.get_closest_marker("slow") and not any(
        os.path.basename(f) == i.path.name and i.nodeid.split("::", 1)[1].startswith(t) for f, t in named)]
    if left:
        out = set(map(id, left))
        items[:] = [i for i in items if id(i) not in out]
        config.hook.pytest_deselected(items=left)
        config.stash[_LEFT] = len(left)


_LEFT = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    left = config.stash.get(_LEFT, 0)
    if left:
        terminalreporter.write_line(f"{left} slow tests left out: -m slow, or {ENV}=1 with the same command, runs them")
