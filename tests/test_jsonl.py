"""nanoseek.jsonl, the one JSONL reader/writer: what each error mode does with a bad line, and the
metrics log of a resumed run (lines past the checkpoint dropped, a torn line ends it)."""

import pytest

from nanoseek.errors import NanoseekError
from nanoseek.jsonl import JsonlLog, append_jsonl, iter_jsonl, read_jsonl, write_jsonl
from nanoseek.train.run import MetricsLog

GOOD = '{"step": 1}\n\n{"step": 2, "text": "问题"}\n'


def test_strict_names_the_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(GOOD + '{"step": 3\n{"step": 4}\n')
    with pytest.raises(NanoseekError, match=r"d\.jsonl:4: not JSON \(.*, column \d+\)"):
        read_jsonl(f)
    assert [n for n, _ in iter_jsonl(f, errors="skip")] == [1, 3, 5]      # blank line 2 skipped, bad 4 passed over
    assert read_jsonl(f, errors="stop") == [{"step": 1}, {"step": 2, "text": "问题"}]
    with pytest.raises(NanoseekError, match=":4: not JSON"):          # not the last line: not a torn write
        read_jsonl(f, errors="torn_tail")
    with pytest.raises(NanoseekError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError):
        read_jsonl(f, errors="ignore")


def test_torn_tail_drops_only_the_last_line(tmp_path):
    f = tmp_path / "traces.jsonl"
    f.write_text(GOOD + '{"step": 3, "te\n\n')
    assert read_jsonl(f, errors="torn_tail") == [{"step": 1}, {"step": 2, "text": "问题"}]
    with pytest.raises(NanoseekError, match=":4: not JSON"):
        read_jsonl(f)


def test_undecodable_bytes(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_bytes(b'{"a": 1}\n\xff\xfe\n{"a": 2}\n')
    with pytest.raises(NanoseekError, match="unreadable"):
        read_jsonl(f)
    assert read_jsonl(f, errors="skip") == [{"a": 1}, {"a": 2}]


def test_writers_round_trip_and_keep_unicode_readable(tmp_path):
    f = tmp_path / "w.jsonl"
    rows = [{"q": "问题", "n": 1}, [1, 2], "s"]
    write_jsonl(f, rows)
    append_jsonl(f, [{"n": 2}], fsync=True)
    log = JsonlLog(f)
    log.write({"n": 3})
    log.close()
    assert read_jsonl(f) == rows + [{"n": 2}, {"n": 3}]
    assert "问题" in f.read_text(encoding="utf-8")


def test_metrics_log_of_a_resumed_run(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(f'{{"step": {s}, "loss": {1 / s}}}\n' for s in range(1, 6)) + '{"step": 6, "lo')
    log = MetricsLog(f, resume_step=3)        # the checkpoint was at step 3; steps 4, 5 and the torn 6 go
    log.write({"step": 4, "loss": 0.0})
    log.close()
    assert [r["step"] for r in read_jsonl(f)] == [1, 2, 3, 4]
    MetricsLog(f, resume_step=None).close()   # a fresh run starts an empty log
    assert read_jsonl(f) == []
