"""How the UI writes numbers, sizes, durations, estimates and dates."""

import datetime

from kimi_desk.app import formatting

NOW = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.timezone.utc)


def test_sizes_and_durations():
    assert [formatting.nbytes(n) for n in (0, 1023, 1024, 3 * 1024**2 + 1, 5 * 1024**4)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "3.0 MiB",
        "5120.0 GiB",
    ]
    assert [formatting.duration(s) for s in (None, 0.4, 59.6, 61, 3599, 3600 * 5 + 61)] == [
        "unknown",
        "0 s",
        "1 min 00 s",
        "1 min 01 s",
        "59 min 59 s",
        "5 h 01 min",
    ]


def test_reading_estimate():
    assert formatting.estimate(0, 1000.0) == "resumed: 0 tokens to read"
    assert formatting.estimate(5000, None) == "5,000 tokens to read"
    assert (
        formatting.estimate(5000, 1000.0)
        == "5,000 tokens to read: estimated under a minute on this device (about 1,000 tokens/s)"
    )
    assert "estimated 17 min" in formatting.estimate(1_000_000, 1000.0)


def test_ago():
    def at(**delta):
        return (NOW - datetime.timedelta(**delta)).isoformat()

    assert [
        formatting.ago(at(seconds=5), NOW),
        formatting.ago(at(minutes=5), NOW),
        formatting.ago(at(hours=3), NOW),
        formatting.ago(at(days=1, hours=2), NOW),
        formatting.ago(at(days=3), NOW),
        formatting.ago(at(days=30), NOW),
    ] == ["just now", "5 min ago", "3 h ago", "yesterday", "3 days ago", "2026-10-28"]
    assert formatting.ago("not a date", NOW) == "not a date"


def test_short_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert formatting.short_path(str(tmp_path / "code" / "repo")) == "~/code/repo"
    assert formatting.short_path("/elsewhere/repo") == "/elsewhere/repo"


def test_clock_and_fit():
    assert formatting.clock(None) == "?" and formatting.clock(float("nan")) == "?"
    assert formatting.clock(65) == "1:05" and formatting.clock(3723) == "1:02:03"
    assert formatting.fit("abcdef", 10) == "abcdef" and formatting.fit("abcdef", 4) == "abc…"
