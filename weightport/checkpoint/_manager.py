"""Rotating checkpoints in a folder: :class:`Manager`."""

from __future__ import annotations

import builtins
import datetime
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightport.checkpoint import _dcp
from weightport.checkpoint._format import CheckpointFile, read_complete_body
from weightport.checkpoint._resume import ResumeState, resume
from weightport.checkpoint._save import as_path, save, unwrap
from weightport.checkpoint._tree import decode
from weightport.errors import CheckpointError, SourceNotFoundError

log = logging.getLogger(__name__)

_STAMP = "%Y%m%dT%H%M%S.%fZ"
_MODES = ("min", "max")
_RETRIES = 5  # listings, and resumes, of a folder that another process rotated meanwhile
_EMPTY_RETRIES = 200  # listings while every file seen vanished: a writer rotating faster than we list
_GONE = object()  # a file removed while it was read


@dataclass(frozen=True)
class _Record:
    path: Path
    stamp: datetime.datetime
    epoch: int | None
    step: int | None
    metrics: dict[str, Any]


class Manager:
    """Keeps the last and the best checkpoints of a run in one folder.

    File names carry the epoch, the step and a UTC timestamp
    (``ckpt-e0003-s00001200-20250101T120000.123456Z.safetensors``). A sharded model's checkpoints
    are DCP folders of the same names without the extension: call :meth:`save` and :meth:`resume`
    on every rank then; rank 0 names the folder (the name reaches the others under the process
    group's timeout) and rotates. Every file is written
    atomically (temporary file, fsync, rename): a run killed mid-save leaves only a hidden
    temporary file, which :meth:`list`, :meth:`latest` and :meth:`best` never return and the
    next :meth:`save` removes. Old checkpoints are deleted only after a new one is complete.

    Args:
        folder: Where checkpoints go (created when needed).
        keep_last: How many of the most recent checkpoints to keep; ``None`` keeps all.
        keep_best: How many of the best checkpoints by ``metric`` to keep as well.
        metric: The metric (a key of ``metrics=`` in :meth:`save`) that ranks checkpoints.
        mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
        prefix: The file name prefix; files with other names in the folder are left alone.

    Raises:
        CheckpointError: an option is out of range.

    Example:
        >>> mgr = wp.checkpoint.Manager("runs/a", keep_last=3, keep_best=1, metric="val_loss", mode="min")
        >>> state = mgr.resume(model=model, optimizer=opt)      # None on a fresh run
        >>> for epoch in range(state.epoch + 1 if state else 0, epochs):
        ...     mgr.save(model=model, optimizer=opt, epoch=epoch, metrics={"val_loss": val_loss})
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        keep_last: int | None = 3,
        keep_best: int = 1,
        metric: str | None = "val_loss",
        mode: str = "min",
        prefix: str = "ckpt",
    ) -> None:
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
            raise CheckpointError(f"keep_last must be an int >= 1 or None (keep all), not {keep_last!r}")
        if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
            raise CheckpointError(f"keep_best must be an int >= 0, not {keep_best!r}")
        if metric is not None and not isinstance(metric, str):
            raise CheckpointError(f"metric must be the name of a metric (a str) or None, not {metric!r}")
        if mode not in _MODES:
            raise CheckpointError(f"mode must be 'min' or 'max', not {mode!r}")
        if keep_best and not metric:
            raise CheckpointError("keep_best needs metric= (the key of metrics= that ranks checkpoints)")
        if not isinstance(prefix, str) or not prefix or os.sep in prefix or prefix.startswith("."):
            raise CheckpointError(f"prefix {prefix!r} must be a plain file name part")
        self.folder = Path(as_path(folder, "folder"))
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.metric = metric
        self.mode = mode
        self.prefix = prefix
        self._name = re.compile(  # a file, or the folder of a sharded model's checkpoint (no extension)
            rf"^{re.escape(prefix)}(?:-e(-?\d+))?(?:-s(-?\d+))?-(\d{{8}}T\d{{6}}\.\d{{6}}Z)"
            r"(\.safetensors)?$"
        )
        self._leftover = re.compile(rf"^\.{re.escape(prefix)}-.*Z(?:\.safetensors)?\.tmp-")
        self._cache: dict[str, tuple[tuple[int, int], _Record | None]] = {}
        self._warned_metric = False

    def __repr__(self) -> str:
        return (
            f"Manager({str(self.folder)!r}, keep_last={self.keep_last}, keep_best={self.keep_best}, "
            f"metric={self.metric!r}, mode={self.mode!r})"
        )

    # -- writing ------------------------------------------------------------------------------------
    def save(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        epoch: int | None = None,
        step: int | None = None,
        metrics: Mapping[str, float] | None = None,
        extra: Mapping[str, Any] | None = None,
        rng: bool = True,
    ) -> Path:
        """Write a new checkpoint (see :func:`weightport.checkpoint.save`), then delete the ones
        neither among the last ``keep_last`` nor the best ``keep_best``.

        Returns:
            The new file's path.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        sharded = _dcp.is_sharded(unwrap(model)[0])  # every rank saves; rank 0 names the folder and rotates
        name = failure = None
        if _dcp.rank() == 0 or not sharded:
            try:
                self._remove_leftovers()
                name = self._file_name(epoch, step, self._records(), sharded)
            except CheckpointError as e:
                if not sharded:
                    raise
                failure = e
        if sharded and _dcp.world_size() > 1:
            box = [(name, None if failure is None else str(failure))]
            torch.distributed.broadcast_object_list(box, src=0)  # under the process group's timeout
            name, message = box[0]
            if message is not None:
                raise CheckpointError(f"{self.folder}: rank 0 could not name the new checkpoint ({message})")
        elif failure is not None:
            raise failure
        path = self.folder / str(name)
        if self.keep_best and self.metric not in (metrics or {}) and not self._warned_metric:
            log.warning(
                "Manager: metrics has no %r; this checkpoint cannot count among the best "
                "(pass metrics={%r: ...}, or keep_best=0)",
                self.metric,
                self.metric,
            )
            self._warned_metric = True
        save(
            path,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            epoch=epoch,
            step=step,
            metrics=metrics,
            extra=extra,
            rng=rng,
        )
        if _dcp.rank() == 0 or not sharded:
            self._prune()
        if sharded and _dcp.world_size() > 1:
            torch.distributed.barrier()  # every rank returns once the folder is rotated (the group's timeout)
        return path

    def _file_name(
        self, epoch: int | None, step: int | None, records: builtins.list[_Record], folder: bool = False
    ) -> str:
        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        if records and now <= records[-1].stamp:  # the clock went back: keep file names in save order
            now = records[-1].stamp + datetime.timedelta(microseconds=1)
        parts = [self.prefix]
        if epoch is not None:
            parts.append(f"e{epoch:04d}")
        if step is not None:
            parts.append(f"s{step:08d}")
        parts.append(now.strftime(_STAMP))
        return "-".join(parts) + ("" if folder else ".safetensors")

    def _remove_leftovers(self) -> None:
        """Temporary files of a save that was killed: only the saving process calls this, so none is live."""
        for entry in os.scandir(self.folder):
            if self._leftover.match(entry.name):
                try:
                    _remove(entry.path)
                    log.info("Manager: removed %s, left by an interrupted save", entry.path)
                except OSError as e:
                    log.warning("Manager: cannot remove %s (%s)", entry.path, e)

    def _prune(self) -> None:
        records = self._records()
        keep = {r.path for r in (records if self.keep_last is None else records[-self.keep_last :])}
        keep.update(r.path for r in self._ranked(records)[: self.keep_best])
        for r in records:
            if r.path not in keep:
                try:
                    _remove(str(r.path))
                    log.info("Manager: removed %s", r.path)
                except OSError as e:
                    log.warning("Manager: cannot remove %s (%s)", r.path, e)

    # -- reading ------------------------------------------------------------------------------------
    def list(self) -> builtins.list[Path]:
        """Complete checkpoints of this manager's prefix, oldest first."""
        return [r.path for r in self._records()]

    def latest(self) -> Path | None:
        """The most recently saved complete checkpoint, or ``None``."""
        records = self._records()
        return records[-1].path if records else None

    def best(self) -> Path | None:
        """The complete checkpoint with the best ``metric`` (the latest among equals), or ``None``."""
        ranked = self._ranked(self._records())
        return ranked[0].path if ranked else None

    def resume(self, *, model: nn.Module, **options: Any) -> ResumeState | None:
        """Resume from :meth:`latest` (see :func:`weightport.checkpoint.resume`); ``None`` when there is none.

        When another process's :meth:`save` prunes the chosen file before it is opened, the
        then latest checkpoint is resumed instead (a failed resume changes nothing).
        """
        for _ in range(_RETRIES):
            path = self.latest()
            if path is None:
                return None
            try:
                return resume(path, model=model, **options)
            except (SourceNotFoundError, CheckpointError):
                if path.exists():
                    raise
                log.info("Manager: %s was removed before it could be resumed; taking the latest again", path)
        raise CheckpointError(
            f"{self.folder}: the latest checkpoint was removed {_RETRIES} times while resuming; "
            "is another process rotating this folder?"
        )

    def _ranked(self, records: builtins.list[_Record]) -> builtins.list[_Record]:
        if not self.metric:
            return []
        scored = []
        for age, r in enumerate(reversed(records)):  # records are oldest first; among equals the latest wins
            value = r.metrics.get(self.metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                scored.append((value if self.mode == "min" else -value, age, r))
        scored.sort(key=lambda item: (item[0], item[1]))
        return [r for _, _, r in scored]

    def _records(self) -> builtins.list[_Record]:
        """Complete checkpoints, oldest first. Another process may prune files at any moment: a file
        that vanishes between the listing and its reading is left out, silently (it is not damaged),
        and the folder is listed again, so that the file its writer saved meanwhile is seen."""
        found: builtins.list[_Record] = []
        for attempt in range(_EMPTY_RETRIES):
            found, vanished = self._scan()
            if not vanished or (found and attempt + 1 >= _RETRIES):
                break  # a stable listing, or after a few tries one that holds something
        found.sort(key=lambda r: (r.stamp, r.path.name))
        return found

    def _scan(self) -> tuple[builtins.list[_Record], bool]:
        try:
            entries = builtins.list(os.scandir(self.folder))
        except (FileNotFoundError, NotADirectoryError):
            return [], False
        except OSError as e:
            raise CheckpointError(f"{self.folder}: cannot list the checkpoint folder ({e})") from e
        found = []
        vanished = False
        for entry in entries:
            match = self._name.match(entry.name)
            if match is None:
                continue
            try:
                if not (entry.is_file() if match.group(4) else entry.is_dir()):
                    continue
                stat = entry.stat()
            except FileNotFoundError:
                self._cache.pop(entry.path, None)
                vanished = True
                continue
            except OSError as e:
                log.warning("Manager: ignoring %s: %s", entry.path, e)
                continue
            record = self._record(Path(entry.path), match, stat)
            if record is _GONE:
                vanished = True
            elif isinstance(record, _Record):
                found.append(record)
        return found, vanished

    def _record(self, path: Path, match: re.Match[str], stat: os.stat_result) -> _Record | object | None:
        signature = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(str(path))
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            stamp = _stamp(match.group(3), path)
            body = read_complete_body(str(path)) if path.suffix == ".safetensors" else _folder_body(str(path))
            metrics = decode(body.get("metrics", {}), lambda k: None, str(path))
        except CheckpointError as e:
            if not path.exists():  # pruned by the writer while it was read: gone, not damaged
                self._cache.pop(str(path), None)
                return _GONE
            log.warning("Manager: ignoring %s: %s", path, e)
            record = None
        else:
            record = _Record(
                path,
                stamp,
                body.get("epoch"),
                body.get("step"),
                metrics if isinstance(metrics, dict) else {},
            )
        self._cache[str(path)] = (signature, record)
        return record


def _folder_body(path: str) -> dict[str, Any]:
    """The document of a sharded model's checkpoint folder (a DCP folder that opens as a checkpoint)."""
    try:
        with CheckpointFile(path) as ckpt:
            return ckpt.body
    except SourceNotFoundError as e:
        raise CheckpointError(str(e)) from e


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _stamp(text: str, path: Path) -> datetime.datetime:
    try:
        return datetime.datetime.strptime(text, _STAMP)
    except ValueError as e:  # twelve digits that are no date, e.g. a 13th month
        raise CheckpointError(f"{path}: the time in the file name is not a date ({e})") from e
