"""Ctrl-C stops a command even where a finalizer swallowed the KeyboardInterrupt it raised."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from seglab import interrupts
from seglab.cli import main
from seglab.engine.predictor import equal_size_runs


@pytest.fixture
def python_handlers(monkeypatch: pytest.MonkeyPatch):
    """Python's own SIGINT handler and unraisable hook before the test, and again after it."""
    handler, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(interrupts, "_interrupted", False)
    yield
    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = hook


class _RaisesTheSignalWhenFinalised:
    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)  # the handler runs here, inside the finalizer


def test_an_interrupt_swallowed_by_a_finalizer_is_raised_at_the_next_check(python_handlers, capsys: pytest.CaptureFixture) -> None:
    assert interrupts.handle_interrupts()
    _RaisesTheSignalWhenFinalised()  # dropped at once: KeyboardInterrupt in __del__, which Python ignores
    assert "Exception ignored" not in capsys.readouterr().err  # no traceback for it
    with pytest.raises(KeyboardInterrupt):
        interrupts.raise_if_interrupted()


def test_without_the_handler_a_finalizer_loses_the_interrupt(python_handlers) -> None:
    # What the handler is for: with Python's own, the interrupt goes to the unraisable hook and
    # the program runs on.
    reported: list[type[BaseException] | None] = []
    sys.unraisablehook = lambda unraisable: reported.append(unraisable.exc_type)
    _RaisesTheSignalWhenFinalised()
    assert reported == [KeyboardInterrupt]
    interrupts.raise_if_interrupted()  # nothing recorded


def test_a_handler_the_user_set_is_left_in_place(python_handlers) -> None:
    def theirs(signum, frame) -> None:
        return None

    signal.signal(signal.SIGINT, theirs)
    assert not interrupts.handle_interrupts() and signal.getsignal(signal.SIGINT) is theirs


def test_a_recorded_interrupt_stops_prediction_and_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(interrupts, "_interrupted", True)
    with pytest.raises(KeyboardInterrupt):
        next(equal_size_runs([(tmp_path / "never-read.png",)], 3, 1))
    code = main(["train", "--epochs", "1", "--train-samples", "8", "--val-samples", "4", "--image-size", "32",
                 "--out", str(tmp_path / "runs"), "--name", "stopped"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    metrics = tmp_path / "runs" / "stopped" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # stopped at the first batch: no epoch
