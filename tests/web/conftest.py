"""The studio's browser tests report what they measured at the end of the run.

A test records ``record_property("studio ...", value)``; every such property is printed in
the terminal summary (and lands in a JUnit XML report like any property).
"""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter) -> None:
    lines = [
        f"{name}: {value}"
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if str(name).startswith("studio ")
    ]
    if lines:
        terminalreporter.section("studio")
        for line in lines:
            terminalreporter.write_line(line)
