"""Model kinds a site installs itself: Python distributions in the entry-point group
``quorum.models``, never code sent by the server.

A distribution (e.g. ``packages/quorum-resmlp``) declares, in its ``pyproject.toml``::

    [project.entry-points."quorum.models"]
    resmlp = "quorum_resmlp:KIND"

and the object it names has a ``name`` (the entry point's name), a ``version`` (the
distribution's version) and two methods (:class:`ModelKind`): ``validate(options)`` returns
the normalised declarative options or raises ``ValueError`` naming the option, and
``build(options, n_features=..., n_outputs=...)`` returns a torch module mapping
(n, n_features) float32 to (n, n_outputs). It never reads files, the network or the clock.

A plan names such a kind with ``{"kind": "installed", "name", "version", "sha256",
"options"}``. :func:`resolve` finds it among the installed distributions and refuses it (with
the reason) unless the name is installed, the version is the plan's and the distribution's
digest (:func:`distribution_digest`) is the plan's ``sha256``.

The digest: SHA-256 over the lines ``<path>\\0<sha256 of the file's bytes>\\n`` of the
distribution's files, sorted by path (POSIX, relative to the folder it is installed in), leaving
out what the installer writes rather than the wheel carries: ``*.dist-info/RECORD``,
``INSTALLER``, ``REQUESTED``, ``direct_url.json``, byte code (``__pycache__``, ``*.pyc``) and
files outside that folder (console scripts). The files are hashed from the bytes on disk, not
taken from RECORD, so a file edited after installation changes the digest. The same digest
comes from the wheel file itself (:func:`wheel_digest`): the proposer states it from the wheel
it publishes, a site recomputes it from what it installed (``quorum-agent models``, or
:func:`installed_kinds`). Editable installs are refused: their code is not in the
distribution's files, so no digest can cover it.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: listing and checking installed kinds loads no torch
    from torch import nn

__all__ = [
    "ENTRY_POINT_GROUP",
    "INSTALLER_FILES",
    "InstalledKind",
    "KindUnavailable",
    "ModelKind",
    "announced",
    "check_announcement",
    "distribution_digest",
    "installed_kinds",
    "resolve",
    "wheel_digest",
]

ENTRY_POINT_GROUP = "quorum.models"
# Written by the installer (pip, uv), not carried by the wheel: left out of the digest.
INSTALLER_FILES = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"})
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


MAX_ANNOUNCED = 64  # installed kinds one hello may announce
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def check_announcement(raw: Any) -> list[dict[str, str]]:
    """The installed kinds an agent announced in ``hello`` (``capabilities.models``), checked:
    a list of at most :data:`MAX_ANNOUNCED` ``{"name", "version", "sha256"}`` with a valid
    name, a version of at most 64 characters and a hex digest, sorted by name.

    Raises:
        ValueError: naming the first faulty entry.
    """
    if not isinstance(raw, list) or len(raw) > MAX_ANNOUNCED:
        raise ValueError(f"capabilities.models must be a list of at most {MAX_ANNOUNCED} kinds")
    kinds: list[dict[str, str]] = []
    for i, entry in enumerate(raw):
        where = f"capabilities.models[{i}]"
        if not isinstance(entry, Mapping) or set(entry) != {"name", "version", "sha256"}:
            raise ValueError(f"{where} must be exactly {{name, version, sha256}}")
        name, version, digest = entry["name"], entry["version"], entry["sha256"]
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ValueError(f"{where}.name must match {NAME_PATTERN.pattern}")
        if not isinstance(version, str) or not 0 < len(version) <= 64:
            raise ValueError(f"{where}.version must be a text of 1 to 64 characters")
        if not isinstance(digest, str) or not SHA256_PATTERN.match(digest):
            raise ValueError(f"{where}.sha256 must be 64 lowercase hex digits")
        kinds.append({"name": name, "version": version, "sha256": digest})
    return sorted(kinds, key=lambda k: (k["name"], k["version"], k["sha256"]))


def announced(spec: Mapping[str, Any], announcements: Iterable[list[dict[str, str]]]) -> bool:
    """Whether a plan's installed model (``{"kind": "installed", "name", "version",
    "sha256"}``) is among what at least one site announced (name, version and digest)."""
    wanted = {
        "name": spec.get("name"),
        "version": spec.get("version"),
        "sha256": spec.get("sha256"),
    }
    return any(wanted in kinds for kinds in announcements)


class KindUnavailable(LookupError):
    """A plan's installed model kind cannot be used here; the message says why and what to do."""


@runtime_checkable
class ModelKind(Protocol):
    """What a ``quorum.models`` entry point names."""

    name: str
    version: str

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The normalised options (defaults filled in); ValueError naming a bad option."""

    def build(self, options: Mapping[str, Any], *, n_features: int, n_outputs: int) -> nn.Module:
        """A module mapping (n, n_features) float32 features to (n, n_outputs) outputs."""


@dataclass(frozen=True)
class InstalledKind:
    """One installed model kind: its name, its distribution's name, version and digest."""

    name: str
    distribution: str
    version: str
    sha256: str
    kind: ModelKind | None  # None when the entry point failed to load (``problem`` says why)
    problem: str | None = None

    def announcement(self) -> dict[str, str]:
        """What an agent may announce of it: name, version, sha256."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def _kept(path: PurePosixPath) -> bool:
    if not path.parts or path.parts[0] == ".." or path.is_absolute():
        return False
    if "__pycache__" in path.parts or path.suffix == ".pyc":
        return False
    return not (
        len(path.parts) == 2
        and path.parts[0].endswith(".dist-info")
        and path.name in INSTALLER_FILES
    )


def _digest(entries: Iterable[tuple[str, bytes]]) -> str:
    lines = sorted(f"{path}\0{hashlib.sha256(data).hexdigest()}\n" for path, data in entries)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def _editable(dist: metadata.Distribution) -> bool:
    text = dist.read_text("direct_url.json")
    if not text:
        return False
    try:
        info = json.loads(text)
    except ValueError:
        return False
    return bool(isinstance(info, dict) and (info.get("dir_info") or {}).get("editable"))


def distribution_digest(dist: metadata.Distribution) -> str:
    """The digest of an installed distribution (see the module's docstring).

    Raises:
        KindUnavailable: the distribution is an editable install, lists no files, or a listed
            file cannot be read.
    """
    name = dist.metadata["Name"]
    if _editable(dist):
        raise KindUnavailable(
            f"distribution {name!r} is an editable install: its code is outside the installed "
            "files, so no digest covers it; install it from its wheel"
        )
    files = dist.files
    if not files:
        raise KindUnavailable(f"distribution {name!r} lists no files (no RECORD); reinstall it")
    entries = []
    for file in files:
        posix = PurePosixPath(str(file).replace("\\", "/"))
        if not _kept(posix):
            continue
        try:
            data = Path(str(file.locate())).read_bytes()
        except OSError as exc:
            raise KindUnavailable(
                f"distribution {name!r}: cannot read its file {posix}: {exc}; reinstall it"
            ) from None
        entries.append((str(posix), data))
    return _digest(entries)


def wheel_digest(path: str | Path) -> str:
    """The digest of a wheel file: equal to :func:`distribution_digest` once it is installed.

    Files under ``<name>.data/purelib/`` and ``platlib/`` count at their installed path; other
    ``.data`` parts (scripts, headers, data) are installed outside site-packages and left out.
    """
    entries = []
    with zipfile.ZipFile(path) as wheel:
        for info in wheel.infolist():
            if info.is_dir():
                continue
            posix = PurePosixPath(info.filename)
            if posix.parts and posix.parts[0].endswith(".data"):
                if len(posix.parts) < 3 or posix.parts[1] not in ("purelib", "platlib"):
                    continue
                posix = PurePosixPath(*posix.parts[2:])
            if _kept(posix):
                entries.append((str(posix), wheel.read(info)))
    return _digest(entries)


def _load(entry: metadata.EntryPoint, dist: metadata.Distribution) -> InstalledKind:
    version = dist.version
    dist_name = dist.metadata["Name"]
    try:
        digest = distribution_digest(dist)
    except KindUnavailable as exc:
        return InstalledKind(entry.name, dist_name, version, "", None, str(exc))
    try:
        kind = entry.load()
    except Exception as exc:  # a site's own package failing to import: report, never crash
        return InstalledKind(
            entry.name, dist_name, version, digest, None, f"its entry point fails to load: {exc}"
        )
    problem = None
    if not isinstance(kind, ModelKind):
        problem = "its entry point is not a model kind (name, version, validate, build)"
    elif kind.name != entry.name:
        problem = f"it calls itself {kind.name!r}, its entry point {entry.name!r}"
    elif kind.version != version:
        problem = f"it declares version {kind.version!r}, its distribution {version!r}"
    elif not NAME_PATTERN.match(entry.name):
        problem = f"its name must match {NAME_PATTERN.pattern}"
    return InstalledKind(entry.name, dist_name, version, digest, None if problem else kind, problem)


def installed_kinds(path: list[str] | None = None) -> dict[str, InstalledKind]:
    """Every model kind installed in the ``quorum.models`` group, by name, with its digest.

    Args:
        path: folders to look in (``sys.path`` when None), as ``importlib.metadata`` takes it.

    Returns:
        name -> :class:`InstalledKind`; a kind that cannot be used has ``kind`` None and its
        ``problem``. Two distributions offering one name: the first on the path.
    """
    found: dict[str, InstalledKind] = {}
    dists = metadata.distributions(path=path) if path is not None else metadata.distributions()
    for dist in dists:
        for entry in dist.entry_points:
            if entry.group == ENTRY_POINT_GROUP and entry.name not in found:
                found[entry.name] = _load(entry, dist)
    return found


def resolve(spec: Mapping[str, Any], kinds: Mapping[str, InstalledKind] | None = None) -> ModelKind:
    """The installed kind a plan's ``{"kind": "installed", ...}`` model spec names.

    Args:
        spec: the model spec, validated by ``fedcore.models.validate_model_spec``.
        kinds: the installed kinds to choose from (:func:`installed_kinds` when None).

    Raises:
        KindUnavailable: not installed, unusable, another version or another digest.
    """
    name, version, digest = spec["name"], spec["version"], spec["sha256"]
    available = installed_kinds() if kinds is None else kinds
    found = available.get(name)
    if found is None:
        have = ", ".join(sorted(available)) or "none"
        raise KindUnavailable(
            f"model kind {name!r} is not installed here (installed kinds: {have}); the site "
            f"operator installs it (pip install) after reviewing it"
        )
    if found.version != version:
        raise KindUnavailable(
            f"model kind {name!r}: the plan needs version {version}, this site has "
            f"{found.version} (distribution {found.distribution!r})"
        )
    if found.kind is None:
        raise KindUnavailable(f"model kind {name!r} cannot be used here: {found.problem}")
    if found.sha256 != digest:
        raise KindUnavailable(
            f"model kind {name!r} {version}: the installed distribution's digest is "
            f"{found.sha256[:16]}..., the plan's {str(digest)[:16]}...: not the code the plan "
            "was approved with"
        )
    return found.kind


def main(argv: list[str] | None = None) -> int:
    """``python -m fedcore.model_kinds [WHEEL ...]``: the digest of each wheel named, or with no
    argument every installed kind's name, version and digest (what a plan must state)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args:
        for path in args:
            print(f"{wheel_digest(path)}  {path}")
        return 0
    for name, found in sorted(installed_kinds().items()):
        status = "ok" if found.kind is not None else f"unusable: {found.problem}"
        print(f"{name}  {found.version}  {found.sha256 or '-'}  ({found.distribution}; {status})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
