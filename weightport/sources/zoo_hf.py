"""``hf:`` sources: weights in a Hugging Face hub repository, through ``huggingface_hub`` and its cache.

Specs: ``hf:org/name``, ``hf:org/name@revision``, ``hf:org/name:path/in/repo.safetensors`` and
``hf:org/name@revision:path``. Without a file, the weights file is chosen like a local folder's
(``model.safetensors`` before its index, safetensors before ``.bin``). Only the weight files needed
are fetched: the chosen file, or a shard index and then, lazily, the shards that hold tensors the
transfer reads. Offline (``HF_HUB_OFFLINE=1``, or the hub unreachable) everything comes from the
cache, and a file that is not cached fails with one line that names the repo, the cache folder and
the command that would fetch it.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from weightport.errors import SourceError, SourceNotFoundError
from weightport.sources.base import Source, SourceInfo
from weightport.sources.files import open_path
from weightport.sources.folder import PREFERRED, WEIGHT_SUFFIXES, ShardedSource, _read_index

log = logging.getLogger(__name__)

_REPO = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HubSpec:
    """A parsed ``hf:`` spec.

    Attributes:
        repo: ``org/name``.
        revision: Branch, tag or commit; ``None`` for the default branch.
        filename: Path of the weights file in the repo; ``None`` to choose one.
    """

    repo: str
    revision: str | None = None
    filename: str | None = None

    @classmethod
    def parse(cls, rest: str) -> HubSpec:
        """Parse what follows ``hf:``.

        Raises:
            SourceError: Not ``org/name[@revision][:path]``.
        """
        head, _, filename = rest.partition(":")
        repo, _, revision = head.partition("@")
        if not _REPO.match(repo) or (filename and (filename.startswith("/") or ".." in filename.split("/"))):
            raise SourceError(
                f"hf:{rest}: expected 'hf:org/name', 'hf:org/name@revision' or 'hf:org/name:path/in/repo.safetensors'"
            )
        return cls(repo, revision or None, filename or None)

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf:{self.repo}{rev}" + (f":{self.filename}" if self.filename else "")


def hub_offline() -> bool:
    """Whether downloads are off: ``HF_HUB_OFFLINE`` or ``WEIGHTPORT_OFFLINE`` is set (read at call time)."""
    from huggingface_hub import constants

    env = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "WEIGHTPORT_OFFLINE"))
    return any(v in _TRUE for v in env) or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so that a machine without network falls back to the
    cache at once instead of after huggingface_hub's retries (about 25 s). Behind a proxy the probe
    cannot tell, and huggingface_hub decides."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout).close()
    except OSError as e:
        log.info("the Hugging Face hub (%s) is unreachable (%s); using the local cache", constants.ENDPOINT, e)
        return False
    return True


def hub_cache_dir() -> str:
    """The huggingface_hub cache folder, from ``HF_HUB_CACHE`` / ``HF_HOME`` at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def open_hf(
    rest: str, *, checkpoint_key: str | None = None, check_hash: bool = True, trust_pickle: bool = False
) -> Source:
    """Open ``hf:`` weights lazily (the ``hf`` scheme opener).

    Args:
        rest: What follows ``hf:`` (``org/name[@revision][:path]``).
        checkpoint_key: Key of the weights inside a nested torch checkpoint.
        check_hash: Unused for the hub (huggingface_hub names cached blobs by their hash);
            accepted so that every scheme takes the same options.
        trust_pickle: Read ``.bin`` torch files with full pickle (runs code from the file).

    Raises:
        SourceNotFoundError: Unknown repo, revision or file, or not cached while offline.
    """
    del check_hash
    spec = HubSpec.parse(rest)
    repo = _Repo.resolve(spec)
    filename = spec.filename or repo.choose()
    path = repo.fetch(filename)
    provenance: dict[str, Any] = {
        "repo": spec.repo,
        "revision": spec.revision or "main",
        "commit": repo.commit,
        "file": filename,
        "url": repo.url(filename),
        "offline": repo.offline,
    }
    blob = os.path.basename(os.path.realpath(path))
    if re.fullmatch(r"[0-9a-f]{64}", blob):
        provenance["sha256"] = blob  # LFS files are stored under their sha256
    if filename.endswith(".index.json"):
        source: Source = HubShardedSource(path, repo, filename, trust_pickle=trust_pickle, location=str(spec))
        provenance["shards"] = len(source.info.files) - 1
    else:
        source = open_path(path, checkpoint_key=checkpoint_key, trust_pickle=trust_pickle)
    provenance["format"] = source.info.kind
    return source.renamed({}, kind="hf", location=str(spec), provenance={**source.info.provenance, **provenance})


class _Repo:
    """One repository at one commit: its file names and a way to fetch any of them."""

    def __init__(self, spec: HubSpec, commit: str | None, files: list[str], cache: str, offline: bool) -> None:
        self.spec, self.commit, self.files, self.cache, self.offline = spec, commit, files, cache, offline

    @classmethod
    def resolve(cls, spec: HubSpec) -> _Repo:
        cache = hub_cache_dir()
        if not hub_offline() and _hub_reachable():
            online = cls._from_hub(spec, cache)
            if online is not None:
                return online
        commit, files = _cached_snapshot(cache, spec)
        return cls(spec, commit, files, cache, offline=True)

    @classmethod
    def _from_hub(cls, spec: HubSpec, cache: str) -> _Repo | None:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            info = HfApi().model_info(spec.repo, revision=spec.revision)
        except GatedRepoError as e:
            raise SourceError(f"{spec}: the repository is gated; accept its terms and run `hf auth login`") from e
        except RepositoryNotFoundError as e:
            raise SourceNotFoundError(
                f"{spec}: no such repository on the hub (or it is private: `hf auth login`)"
            ) from e
        except RevisionNotFoundError as e:
            raise SourceNotFoundError(f"{spec}: the repository has no revision {spec.revision!r}") from e
        except Exception as e:  # noqa: BLE001 - network down, proxy, timeout: fall back to the cache
            log.info("%s: the hub is unreachable (%s); using the local cache", spec, type(e).__name__)
            return None
        return cls(spec, info.sha, [s.rfilename for s in info.siblings or ()], cache, offline=False)

    def choose(self) -> str:
        """The weights file to read, in the order a local folder uses."""
        for name in PREFERRED:
            if name in self.files:
                return name
        top = [f for f in self.files if "/" not in f]
        indexes = [f for f in top if f.endswith(".index.json")]
        singles = [f for f in top if f.endswith(WEIGHT_SUFFIXES)]
        safes = [f for f in singles if f.endswith(".safetensors")]
        for group in ([f for f in indexes if "safetensors" in f], indexes, safes, singles):
            if len(group) == 1:
                return group[0]
            if len(group) > 1:
                raise SourceNotFoundError(
                    f"{self.spec}: several weight files ({', '.join(sorted(group))}); "
                    f"name one: hf:{self.spec.repo}:{sorted(group)[0]}"
                )
        if self.offline:
            raise SourceNotFoundError(
                _not_cached(self.spec, self.cache, None) + f" (cached files: {_listed(self.files)})"
            )
        raise SourceNotFoundError(
            f"{self.spec}: no weights file in the repository{self._where()} (files: {_listed(self.files)}); "
            f"name one with hf:{self.spec.repo}:PATH"
        )

    def fetch(self, filename: str) -> str:
        """The local path of ``filename`` at this commit, downloading it when allowed.

        Raises:
            SourceNotFoundError: The repo has no such file, or it is not cached while offline.
        """
        if filename not in self.files and (self.files or self.offline):
            weights = _listed([f for f in self.files if f.endswith((*WEIGHT_SUFFIXES, ".index.json"))])
            if self.offline:
                raise SourceNotFoundError(
                    f"{_not_cached(self.spec, self.cache, filename)} (cached weight files: {weights})"
                )
            raise SourceNotFoundError(
                f"{self.spec}: no file {filename!r} in the repository{self._where()}; its weight files are: {weights}"
            )
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

        try:
            return str(
                hf_hub_download(
                    self.spec.repo,
                    filename,
                    revision=self.commit or self.spec.revision,
                    cache_dir=self.cache,
                    local_files_only=self.offline,
                )
            )
        except LocalEntryNotFoundError as e:
            raise SourceNotFoundError(_not_cached(self.spec, self.cache, filename)) from e
        except EntryNotFoundError as e:
            raise SourceNotFoundError(f"{self.spec}: no file {filename!r} in the repository") from e
        except HfHubHTTPError as e:
            raise SourceError(f"{self.spec}: downloading {filename!r} failed ({e}); try again later") from e

    def url(self, filename: str) -> str:
        from huggingface_hub import hf_hub_url

        return str(hf_hub_url(self.spec.repo, filename, revision=self.commit or self.spec.revision))

    def _where(self) -> str:
        at = f" at {self.commit[:12]}" if self.commit else ""
        return at + (" (cached snapshot)" if self.offline else "")


def _cached_snapshot(cache: str, spec: HubSpec) -> tuple[str, list[str]]:
    """``(commit, files)`` of the cached snapshot the spec's revision points to.

    Raises:
        SourceNotFoundError: The repo or the revision is not in the cache.
    """
    folder = Path(cache) / f"models--{spec.repo.replace('/', '--')}"
    revision = spec.revision or "main"
    commit = revision if _COMMIT.match(revision) else None
    ref = folder / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    snapshot = folder / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise SourceNotFoundError(_not_cached(spec, cache, spec.filename))
    files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    return commit or revision, files


def _not_cached(spec: HubSpec, cache: str, filename: str | None) -> str:
    folder = os.path.join(cache, f"models--{spec.repo.replace('/', '--')}")
    rev = f"@{spec.revision}" if spec.revision else ""
    what = f"{filename!r} of {spec.repo}{rev}" if filename else f"{spec.repo}{rev} (its weights)"
    files = f" {filename}" if filename else " --include '*.safetensors' '*.json'"
    cmd = f"hf download {spec.repo}{files}" + (f" --revision {spec.revision}" if spec.revision else "")
    return (
        f"{spec}: {what} is not in the Hugging Face cache (looked in {folder}) and downloads are off "
        f"(HF_HUB_OFFLINE=1 or no network); fetch it with `{cmd}`"
    )


def _listed(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class HubShardedSource(ShardedSource):
    """A sharded hub checkpoint: the index is local, each shard is fetched the first time it is read."""

    def __init__(self, index_path: str, repo: _Repo, index_name: str, *, trust_pickle: bool, location: str) -> None:
        weight_map, metadata = _read_index(index_path)
        folder = os.path.dirname(index_path)
        files = tuple(os.path.join(folder, f) for f in dict.fromkeys(weight_map.values()))
        info = SourceInfo(
            kind="sharded",
            location=location,
            files=(index_path, *files),
            metadata={str(k): str(v) for k, v in metadata.items() if isinstance(v, (str, int, float, bool))},
        )
        Source.__init__(self, {name: (os.path.join(folder, f), name) for name, f in weight_map.items()}, info)
        self._index_path = index_path
        self._shards = {}
        prefix = index_name.rpartition("/")[0]
        self._open_file: Callable[[str], Source] = lambda path: open_path(
            self._fetch(repo, prefix, folder, path), trust_pickle=trust_pickle
        )

    @staticmethod
    def _fetch(repo: _Repo, prefix: str, folder: str, path: str) -> str:
        rel = os.path.relpath(path, folder).replace(os.sep, "/")
        return repo.fetch(f"{prefix}/{rel}" if prefix else rel)

    @property
    def fetched_shards(self) -> list[str]:
        """Shard paths fetched (downloaded or found in the cache) so far."""
        return self.opened_shards
