"""The guest console protocol: frames, raw lines, corrupt frames, line splitting."""

from __future__ import annotations

import base64
import json

import pytest

from vdsa_server.launch import console


def frame(obj: dict[str, object]) -> str:
    return console.MARKER + json.dumps(obj)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (frame({"event": "boot", "kernel": "6.1.0-56-amd64"}), console.Boot("6.1.0-56-amd64")),
        (frame({"event": "line", "b64": b64("hi @@vdsa@@ {}")}),
         console.Line("hi @@vdsa@@ {}")),
        (frame({"event": "result", "name": "check.x", "b64": b64("pass")}),
         console.Result("check.x", "pass")),
        (frame({"event": "dmesg", "b64": b64("[0.0] idxd\n")}),
         console.Dmesg("[0.0] idxd\n")),
        (frame({"event": "exit", "status": 3}), console.Exit(3)),
        ("[    1.234] Run /init as init process",
         console.Raw("[    1.234] Run /init as init process")),
    ],
)
def test_parse_line(line: str, expected: console.Event) -> None:
    assert console.parse_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        console.MARKER + '{"event": "line", "b64": "not base64!"}',
        console.MARKER + '{"event": "exit", "status": "3"}',
        console.MARKER + '{"event": "nonsense"}',
        console.MARKER + '["event"]',
        console.MARKER + '{"event": "result", "na[   12.1] kernel text',
    ],
)
def test_corrupt_frames_stay_raw(line: str) -> None:
    assert console.parse_line(line) == console.Raw(line)


def test_frame_after_kernel_text_on_same_line() -> None:
    line = "[   3.0] x" + frame({"event": "exit", "status": 0})
    assert console.parse_line(line) == console.Exit(0)


def test_transcript_collects_in_order_and_spots_panic() -> None:
    transcript = console.Transcript()
    for line in [
        frame({"event": "boot", "kernel": "k"}),
        frame({"event": "line", "b64": b64("one")}),
        frame({"event": "line", "b64": b64("two")}),
        frame({"event": "result", "name": "a", "b64": b64("1")}),
        frame({"event": "result", "name": "a", "b64": b64("2")}),
        "[ 9.9] Kernel panic - not syncing: Attempted to kill init!",
        frame({"event": "exit", "status": 1}),
    ]:
        transcript.add(console.parse_line(line))
    assert transcript.kernel == "k"
    assert transcript.lines == ["one", "two"]
    assert transcript.results == {"a": "2"}
    assert transcript.exit_status == 1
    assert transcript.panicked


def test_line_splitter_handles_crlf_and_chunk_boundaries() -> None:
    splitter = console.LineSplitter()
    stream = b"first\r\nsec" + b"ond\r" + b"\nthird"
    lines = []
    for i in range(len(stream)):
        lines += splitter.feed(stream[i:i + 1])
    assert lines == ["first", "second"]
    assert splitter.flush() == ["third"]
    assert splitter.flush() == []
