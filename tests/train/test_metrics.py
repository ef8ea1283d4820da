"""Tests for train/metrics.py and train/plot.py.

TensorBoard files are checked by parsing the TFRecord framing with an independent CRC-32C and
decoding the Event protobuf; PNGs by their signature and IHDR header; the progress line against
speeds and ETAs worked out by hand from a fake clock.
"""

import io
import json
import os
import struct
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from train.metrics import MetricsWriter, ProgressBar, read_metrics
from train.plot import main as plot_main
from train.plot import plot_runs

_LOGGED = [
    (0, {"train/loss": 5.5, "train/lr": 0.0}),
    (10, {"train/loss": np.float32(3.25), "train/lr": 1e-3, "val/bpb": 4.75}),
    (20, {"train/loss": np.float64(2.125), "train/lr": 1e-3}),
]


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _read_tfrecords(path: Path) -> list[bytes]:
    blob, pos, records = path.read_bytes(), 0, []
    while pos < len(blob):
        header = blob[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", blob[pos + 8 : pos + 12])
        assert header_crc == _masked_crc(header)
        data = blob[pos + 12 : pos + 12 + length]
        (data_crc,) = struct.unpack("<I", blob[pos + 12 + length : pos + 16 + length])
        assert data_crc == _masked_crc(data)
        records.append(data)
        pos += 16 + length
    return records


def _write_run(run_dir: Path, logged=_LOGGED) -> None:
    with MetricsWriter(run_dir) as writer:
        for step, metrics in logged:
            writer.write(step, metrics)


def test_crc32c_oracle_known_answer():
    assert _crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)


def test_jsonl_round_trip_and_tensorboard_events(tmp_path):
    _write_run(tmp_path)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 10, 20]
    for record, (_, metrics) in zip(records, _LOGGED, strict=True):
        assert set(record) == {"step", "time", *metrics}
        for name, value in metrics.items():
            assert record[name] == float(value)
    times = [r["time"] for r in records]
    assert (
        times == sorted(times)
        and abs(times[-1] - os.path.getmtime(tmp_path / "metrics.jsonl")) < 60
    )

    (event_file,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    scalars = []
    for data in _read_tfrecords(event_file):
        event = event_pb2.Event.FromString(data)
        scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    expected = [
        (name, step, float(np.float32(value)))
        for step, metrics in _LOGGED
        for name, value in metrics.items()
    ]
    assert sorted(scalars) == sorted(expected)


def test_truncated_last_line_is_tolerated_and_repaired(tmp_path):
    _write_run(tmp_path, _LOGGED[:2])
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 20, "train/lo')  # a crash in the middle of a write
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 10]
    _write_run(tmp_path, _LOGGED[2:])  # the resumed run appends after cutting the partial line
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 10, 20]
    assert all(json.loads(line) for line in path.read_text().splitlines())

    path.write_text('{"step": 0}\n{"step": 1,\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
        read_metrics(tmp_path / "missing")


def test_writer_rejects_bad_input(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        with pytest.raises(
            TypeError, match="metric 'train/loss' must be a scalar number, got list"
        ):
            writer.write(1, {"train/loss": [1.0]})
        with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
            writer.write(-1, {"train/loss": 1.0})


class _FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_plain_lines_are_throttled_with_smoothed_rate():
    stream, clock = io.StringIO(), _FakeClock()
    bar = ProgressBar(10, tokens_per_step=1000, stream=stream, interval=10.0, clock=clock)
    for now, step in [(0.0, 1), (1.0, 2), (11.0, 5), (12.0, 10)]:
        clock.now = now
        bar.update(step, loss=2.5 / step)
    bar.close()
    # Rates: none at step 1; 1 step/s at step 2 (not printed: within 10 s of the last line);
    # 3/10 at step 5 -> 1 + 0.1 * (0.3 - 1) = 0.93; 5/1 at step 10 -> 0.93 + 0.1 * 4.07 = 1.337.
    assert stream.getvalue().splitlines() == [
        "step 1/10 | loss 2.5",
        "step 5/10 | loss 0.5 | 930.0 tok/s | ETA 5s",
        "step 10/10 | loss 0.25 | 1.3k tok/s | ETA 0s",
    ]


def test_progress_bar_rewrites_one_line_on_a_terminal():
    stream, clock = _Terminal(), _FakeClock()
    bar = ProgressBar(7200, start_step=100, stream=stream, clock=clock)
    clock.now = 5.0
    bar.update(110, loss=1.23456)
    clock.now = 6.0
    bar.update(120)  # 10 steps/s -> 7080 steps left take 708 s
    bar.close()
    first = "step 110/7200 | loss 1.235"
    second = "step 120/7200 | 10.0 steps/s | ETA 11m48s"
    assert stream.getvalue() == "\r" + first + "\r" + second.ljust(len(first)) + "\n"


def _png_size(path: Path) -> tuple[int, int]:
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and blob[12:16] == b"IHDR"
    return struct.unpack(">II", blob[16:24])


def test_plot_runs_side_by_side(tmp_path):
    run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
    _write_run(run_a)
    _write_run(run_b, [(step, {"train/loss": 1.0 + step}) for step in range(5)])
    out = Path(plot_runs([run_a, run_b], tmp_path / "plots" / "curves.png"))
    assert _png_size(out) == (1000, 400)  # two 5x4 inch subplots at 100 dpi
    assert matplotlib.image.imread(out).shape == (400, 1000, 4)

    plot_main([str(run_a), str(run_b), "--metrics", "train/lr"])
    assert _png_size(run_a / "loss_curves.png") == (500, 400)

    with pytest.raises(ValueError, match=r"metrics \['val/ppl'\] not found"):
        plot_runs([run_a, run_b], tmp_path / "x.png", metrics=["train/loss", "val/ppl"])
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
        plot_runs([run_a, tmp_path / "plots"], tmp_path / "x.png")
    with pytest.raises(SystemExit) as exit_info:
        plot_main([str(tmp_path / "plots")])
    assert exit_info.value.code == 2
