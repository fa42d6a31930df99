"""Progress (weightport/_progress.py): when a bar is shown, what it counts, and that it never breaks a transfer."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import TinyNet, meta_tiny, trained

import weightport as wp
from weightport import _progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("enabled", "tty", "size", "env", "shown"),
    [
        (None, True, _progress.THRESHOLD_BYTES, {}, True),
        (None, True, _progress.THRESHOLD_BYTES - 1, {}, False),  # small: no bar
        (None, False, 10 * _progress.THRESHOLD_BYTES, {}, False),  # not a terminal
        (False, True, 10 * _progress.THRESHOLD_BYTES, {}, False),  # switched off
        (True, False, 1, {}, True),  # forced on
        (None, True, 10 * _progress.THRESHOLD_BYTES, {"WEIGHTPORT_PROGRESS": "0"}, False),
        (None, True, 10 * _progress.THRESHOLD_BYTES, {"TQDM_DISABLE": "1"}, False),
    ],
)
def test_progress_is_shown_only_on_a_terminal_for_large_transfers(monkeypatch, enabled, tty, size, env, shown):
    monkeypatch.delenv("WEIGHTPORT_PROGRESS", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    stream = FakeTTY() if tty else io.StringIO()
    with _progress.progress(enabled, size, stream=stream) as bar:
        assert bar.shown is shown
        bar.update(size)
    assert bool(stream.getvalue()) is shown


def test_transfer_progress_counts_every_byte_and_can_be_switched_off(trained_file, monkeypatch):
    updates: list[int] = []

    class Recorder:
        def update(self, n: int) -> None:
            updates.append(n)

        def close(self) -> None:
            updates.append(-1)

    seen: list[bool | None] = []

    def fake(enabled, total, desc="", stream=None):  # type: ignore[no-untyped-def]
        seen.append(enabled)
        return _progress.Progress(Recorder() if enabled is not False else None)

    monkeypatch.setattr(_progress, "progress", fake)
    for meta in (True, False):
        updates.clear()
        model = meta_tiny() if meta else TinyNet(num_classes=10)
        report = wp.transfer(trained_file, model, progress=True)
        assert updates[-1] == -1 and sum(updates[:-1]) == report.stats["bytes_loaded"]
        updates.clear()
        report = wp.transfer(
            trained_file, meta_tiny() if meta else TinyNet(num_classes=10), progress=True, dtype="float16"
        )
        assert sum(updates[:-1]) == report.stats["bytes_loaded"]  # source bytes, also when casting
    updates.clear()
    wp.transfer(trained_file, meta_tiny(), progress=False)
    assert updates == [] and seen[-1] is False


def test_progress_bar_draws_on_stderr_and_is_silent_when_off(trained_file, capsys):
    wp.transfer(trained_file, meta_tiny(), progress=True)
    assert "weightport" in capsys.readouterr().err
    wp.transfer(trained_file, meta_tiny(), progress=False)
    wp.transfer(trained_file, meta_tiny())  # automatic: pytest's stderr is not a terminal
    assert capsys.readouterr().err == ""


def test_a_broken_progress_bar_never_breaks_a_transfer(trained_file, monkeypatch):
    class Broken:
        def update(self, n: int) -> None:
            raise OSError("terminal went away")

        def close(self) -> None:
            raise OSError("terminal went away")

    monkeypatch.setattr(_progress, "progress", lambda *a, **k: _progress.Progress(Broken()))
    model = meta_tiny()
    wp.transfer(trained_file, model, progress=True)
    assert torch.equal(model.conv1.weight, trained(num_classes=1000).conv1.weight)
