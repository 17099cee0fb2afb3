"""The benchmark record (``bench.record``): a topic run again replaces its own section,
targets and provenance in docs/benchmarks.md and .json, and leaves the others as they were."""

from __future__ import annotations

from pathlib import Path

from bench import record
from bench.common import Section, Target

ORDER = ["overhead", "throughput", "soak"]


def topic(title: str, measured: str, date: str) -> record.Topic:
    section = Section(
        title, f"body of {title}", [Target(f"{title} target", "≤ 1", measured, False, 19)]
    )
    return record.Topic(section, record.Provenance(date, "abc1234", 1.5, "0.3 → 1.9"))


def test_a_topic_run_again_replaces_only_its_own_figures(tmp_path: Path) -> None:
    report = tmp_path / "benchmarks.md"
    first = {
        "throughput": topic("Task throughput", "300 tasks/s", "2026-11-30 07:07 UTC"),
        "overhead": topic("Market overhead", "2.9 ms", "2026-11-30 02:37 UTC"),
        "soak:v3": topic("Soak (protocol 3)", "+5.7 %", "2026-11-30 07:25 UTC"),
    }
    record.write(first, ORDER, report, "NOTES", "TAIL")
    again = {"throughput": topic("Task throughput", "650 tasks/s", "2026-11-30 11:20 UTC")}
    record.write(record.merged(report, again), ORDER, report, "NOTES", "TAIL")

    kept = record.read(report.with_suffix(".json"))
    assert list(kept) == ["overhead", "throughput", "soak:v3"]  # the modules' order
    assert kept["throughput"].section.targets[0].measured == "650 tasks/s"
    assert kept["throughput"].run.date == "2026-11-30 11:20 UTC"
    assert kept["soak:v3"].section.targets[0].measured == "+5.7 %"
    text = report.read_text()
    assert "300 tasks/s" not in text and "650 tasks/s" in text
    assert "| Soak (protocol 3) | 2026-11-30 07:25 UTC | abc1234 | 1.5 | 0.3 → 1.9 |" in text
    assert text.index("NOTES") < text.index("## Market overhead") < text.index("TAIL")
    assert "## Targets (issues #19)" in text


def test_a_record_of_the_older_format_counts_as_none(tmp_path: Path) -> None:
    raw = tmp_path / "benchmarks.json"
    raw.write_text('{"Task throughput": {"v2": {}}}')
    assert record.read(raw) == {}
    assert record.read(tmp_path / "missing.json") == {}
