"""The adapter registry: immutable, numbered adapter versions in object storage, and a `latest` pointer.

Layout under the registry root (any fsspec URL; by default `s3://musiclora/registry`):

```
<root>/<family>/<name>/<version>/adapter_config.json      peft files, exactly as published
<root>/<family>/<name>/<version>/adapter_model.safetensors
<root>/<family>/<name>/<version>/card.json                the adapter card (+ any other flat files)
<root>/<family>/<name>/<version>/claim.json               written FIRST, exclusively: allocates the number
<root>/<family>/<name>/<version>/version.json             written LAST: marks the version complete
<root>/<family>/<name>/latest.json                        the `latest` pointer, one PUT
```

Readers never see a half-written version: a version exists only once its `version.json` is
there, and `version.json` is the last object a publish writes. The pointer is a single small
object replaced in one PUT (atomic on S3 and on a local disk through a rename), and it only ever
names a complete version. Concurrent publishes of one name never share a number: each claims its
number with a conditional create of `claim.json` (S3 `If-None-Match: *`; `O_EXCL` on a local disk)
and moves to the next number when another publish got there first. Versions are positive integers and never change once complete.

Adapters are named by reference `name[@version]`; `version` is an integer or `latest`, and no
version means `latest` (the promoted version, else the newest complete one). Names are unique
across families, so a reference needs no family. Anything but `[A-Za-z0-9._-]` (first character a
letter or digit) is refused before any storage is touched, so `../x`, `/etc`, `s3://...` or
`a/b` can never address an object outside the registry.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from musiclora.adapters import CARD, download_dir, upload_dir
from musiclora.storage import DEFAULT_BUCKET, get_fs, join_url, split_url, storage_errors

REGISTRY_URL_ENV = "MUSICLORA_REGISTRY_URL"
DEFAULT_REGISTRY_URL = f"s3://{DEFAULT_BUCKET}/registry"
MARKER = "version.json"
CLAIM = "claim.json"
MAX_CLAIM_TRIES = 1000
POINTER = "latest.json"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # never published: loading them unpickles
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_VERSION = re.compile(r"[1-9][0-9]{0,8}")
_REF_HELP = (
    "expected NAME[@VERSION]: NAME of 1-100 letters, digits, '.', '_' or '-' starting with a letter "
    "or digit, VERSION a positive integer or 'latest'"
)


class RegistryError(Exception):
    """A registry operation failed; the message names the adapter or URL and what was expected."""


class InvalidReferenceError(RegistryError, ValueError):
    """An adapter reference, name, family or version is not in the allowed syntax."""


class AdapterNotFoundError(RegistryError, LookupError):
    """No such adapter, or no such complete version of it."""


@dataclass(frozen=True)
class AdapterRef:
    """A parsed, syntactically safe adapter reference.

    Attributes:
        name: the adapter's name.
        version: a positive integer, or None for `latest`.
    """

    name: str
    version: int | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


@dataclass(frozen=True)
class AdapterVersion:
    """One complete version in the registry.

    Attributes:
        family: model family name.
        name: adapter name.
        version: positive integer.
        url: folder URL holding the peft files and card.json.
        card: the adapter card (empty when the folder has none).
        info: the version's `version.json` (files with sizes and sha256, source, published_at).
    """

    family: str
    name: str
    version: int
    url: str
    card: dict[str, Any] = field(default_factory=dict, compare=False)
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def ref(self) -> str:
        """The exact reference `name@version`."""
        return f"{self.name}@{self.version}"


def parse_ref(ref: str) -> AdapterRef:
    """Parse `name[@version]`, refusing anything that could address storage outside the registry.

    Raises:
        InvalidReferenceError: not a string, empty, path tricks (`../`, `/`, `\\`), URLs, other
            characters, or a version that is not a positive integer / `latest` (names the input).
    """
    if not isinstance(ref, str):
        raise InvalidReferenceError(f"adapter reference {ref!r} is not a string; {_REF_HELP}")
    name, sep, version = ref.partition("@")
    if not _NAME.fullmatch(name) or (sep and not (version == "latest" or _VERSION.fullmatch(version))):
        raise InvalidReferenceError(f"adapter reference {ref[:200]!r} is not valid; {_REF_HELP}")
    return AdapterRef(name, int(version) if sep and version != "latest" else None)


def check_name(value: str, what: str = "adapter name") -> str:
    """Return `value` if it is a safe registry path segment (the NAME syntax).

    Raises:
        InvalidReferenceError: otherwise (names `what` and the value).
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidReferenceError(
            f"{what} {value!r} is not valid; expected 1-100 letters, digits, '.', '_' or '-' starting with a "
            "letter or digit"
        )
    return value


def default_registry_url() -> str:
    """`$MUSICLORA_REGISTRY_URL`, else `s3://musiclora/registry`."""
    return os.environ.get(REGISTRY_URL_ENV) or DEFAULT_REGISTRY_URL


class Registry:
    """Adapter registry rooted at an fsspec folder URL (s3://..., file://... or a path).

    Every read first drops fsspec's listing cache, so versions and promotions made by other
    processes are seen at once.

    Args:
        url: the registry root; default `default_registry_url()`.
    """

    def __init__(self, url: str | None = None):
        self.url = (url or default_registry_url()).rstrip("/")
        split_url(self.url)  # fail early on a malformed URL

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    # ------------------------------------------------------------------ reading

    def families(self) -> list[str]:
        """Family folders present in the registry (sorted)."""
        return [n for n in self._children(self.url) if _NAME.fullmatch(n)]

    def names(self, family: str) -> list[str]:
        """Adapter names published under `family` (sorted)."""
        return [n for n in self._children(join_url(self.url, check_name(family, "family"))) if _NAME.fullmatch(n)]

    def versions(self, family: str, name: str, complete_only: bool = True) -> list[int]:
        """Version numbers of `family/name`, ascending; by default only complete ones.

        Raises:
            InvalidReferenceError: `family` or `name` is not a safe name.
        """
        folder = self._adapter_url(family, name)
        found = sorted(int(v) for v in self._children(folder) if _VERSION.fullmatch(v))
        if not complete_only:
            return found
        return [v for v in found if self._exists(join_url(folder, str(v), MARKER))]

    def latest(self, family: str, name: str) -> int | None:
        """The version the `latest` pointer names, or None when nothing was promoted."""
        pointer = self._read_json(join_url(self._adapter_url(family, name), POINTER))
        return int(pointer["version"]) if pointer else None

    def find_family(self, name: str) -> str:
        """The family an adapter name is published under.

        Raises:
            AdapterNotFoundError: no family holds `name`.
        """
        check_name(name)
        for family in self.families():
            if self._exists(self._adapter_url(family, name)):
                return family
        raise AdapterNotFoundError(f"no adapter named {name!r} in the registry {self.url}")

    def resolve(self, ref: str | AdapterRef, family: str | None = None) -> AdapterVersion:
        """Resolve `name[@version]` to a complete version (card and version.json included).

        No version means the promoted `latest`, else the newest complete version.

        Raises:
            InvalidReferenceError: bad syntax (see `parse_ref`).
            AdapterNotFoundError: unknown name, unknown or incomplete version, nothing published.
        """
        parsed = ref if isinstance(ref, AdapterRef) else parse_ref(ref)
        family = check_name(family, "family") if family else self.find_family(parsed.name)
        version = parsed.version
        if version is None:
            version = self.latest(family, parsed.name)
        if version is None:
            complete = self.versions(family, parsed.name)
            if not complete:
                raise AdapterNotFoundError(
                    f"adapter {parsed.name!r} ({family}) has no complete version in the registry {self.url}"
                )
            version = complete[-1]
        url = self.version_url(family, parsed.name, version)
        info = self._read_json(join_url(url, MARKER))
        if info is None:
            raise AdapterNotFoundError(
                f"adapter {parsed.name!r} has no version {version} in the registry {self.url} "
                f"(complete versions: {self.versions(family, parsed.name)})"
            )
        card = self._read_json(join_url(url, CARD)) or {}
        return AdapterVersion(family, parsed.name, version, url, card, info)

    def list(self, family: str | None = None) -> list[dict[str, Any]]:
        """One summary per adapter: family, name, versions, latest, base_model (newest card).

        Returns:
            dicts sorted by (family, name); adapters with no complete version are left out.
        """
        out = []
        for fam in [check_name(family, "family")] if family else self.families():
            for name in self.names(fam):
                versions = self.versions(fam, name)
                if not versions:
                    continue
                latest = self.latest(fam, name)
                newest = latest if latest in versions else versions[-1]
                card = self._read_json(join_url(self.version_url(fam, name, newest), CARD)) or {}
                out.append({"family": fam, "name": name, "versions": versions, "latest": latest,
                            "resolves_to": newest, "base_model": card.get("base_model")})
        return out

    def show(self, ref: str, family: str | None = None) -> dict[str, Any]:
        """Everything about one version: ref, url, card, files (version.json), latest pointer.

        Raises:
            InvalidReferenceError, AdapterNotFoundError: as `resolve`.
        """
        v = self.resolve(ref, family)
        return {"family": v.family, "name": v.name, "version": v.version, "ref": v.ref, "url": v.url,
                "latest": self.latest(v.family, v.name), "versions": self.versions(v.family, v.name),
                "card": v.card, "published": v.info}

    def version_url(self, family: str, name: str, version: int) -> str:
        """Folder URL of one version (no existence check)."""
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidReferenceError(f"adapter version {version!r} is not valid; expected a positive integer")
        return join_url(self._adapter_url(family, name), str(version))

    def download(self, version: AdapterVersion, local_dir: str) -> str:
        """Copy a version's files into `local_dir`; returns `local_dir`."""
        return download_dir(version.url, local_dir)

    # ------------------------------------------------------------------ writing

    def publish(
        self,
        source_url: str,
        name: str,
        family: str | None = None,
        version: int | None = None,
        promote: bool = False,
        card_updates: dict[str, Any] | None = None,
    ) -> AdapterVersion:
        """Publish a peft adapter folder as a new immutable version.

        The files are copied first, `version.json` (sizes and sha256 of every file) last; with
        `promote` the `latest` pointer then moves to it.

        Args:
            source_url: adapter folder URL or path (`adapter_config.json`, `adapter_model.safetensors`,
                optional `card.json` and other flat files).
            name: adapter name (NAME syntax); unique across families.
            family: model family; default the card's `family`. Must match the card when both exist.
            version: the version number to create; default the next integer.
            promote: move `latest` to the new version.
            card_updates: keys merged into the published card.json (trial config, metrics ...).

        Returns:
            the new complete version.

        Raises:
            InvalidReferenceError: bad name, family or version.
            ValueError: the source is not a peft folder or holds pickle files (.bin, .pt ...), names another
                family than `family`, no family known, the name exists under another family, or `version`
                already exists.
            FileNotFoundError: nothing at `source_url`.
        """
        import hashlib

        check_name(name)
        with tempfile.TemporaryDirectory(prefix="musiclora-publish-") as tmp:
            download_dir(source_url, tmp)
            missing = [f for f in PEFT_FILES if not (Path(tmp) / f).is_file()]
            if missing:
                raise ValueError(f"{source_url} is not a peft adapter folder: {', '.join(missing)} missing")
            pickles = sorted(f.name for f in Path(tmp).iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                raise ValueError(f"{source_url} holds pickle files {pickles}; the registry takes safetensors + JSON only")
            (Path(tmp) / MARKER).unlink(missing_ok=True)
            card_path = Path(tmp) / CARD
            card = json.loads(card_path.read_text()) if card_path.exists() else {}
            family = self._publish_family(family, card, source_url)
            self._check_unique(name, family)
            number = self._new_version(family, name, version)
            card.update(card_updates or {})
            card_path.write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
            url = self.version_url(family, name, number)
            files = {f.name: {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                     for f in sorted(Path(tmp).iterdir()) if f.is_file()}
            with storage_errors(url):
                upload_dir(tmp, url)
            info = {"format": "musiclora-registry/1", "family": family, "name": name, "version": number,
                    "source": source_url, "published_at": time.time(), "files": files}
            self._write_json(join_url(url, MARKER), info)  # last: the version is now complete
        if promote:
            self.promote(name, number, family)
        return AdapterVersion(family, name, number, url, card, info)

    def promote(self, name: str, version: int | str, family: str | None = None) -> AdapterVersion:
        """Point `latest` of `name` at `version` (one PUT of `latest.json`).

        Raises:
            InvalidReferenceError: bad name or version syntax.
            AdapterNotFoundError: no such adapter or no such complete version; nothing is written.
        """
        if isinstance(version, str) and not _VERSION.fullmatch(version):
            raise InvalidReferenceError(f"adapter version {version!r} is not valid; expected a positive integer")
        target = self.resolve(AdapterRef(check_name(name), int(version)), family)
        previous = self.latest(target.family, target.name)
        self._write_json(join_url(self._adapter_url(target.family, target.name), POINTER),
                         {"version": target.version, "previous": previous, "promoted_at": time.time()})
        return target

    # ------------------------------------------------------------------ internals

    def _adapter_url(self, family: str, name: str) -> str:
        return join_url(self.url, check_name(family, "family"), check_name(name))

    def _publish_family(self, family: str | None, card: dict[str, Any], source_url: str) -> str:
        card_family = card.get("family")
        if family and card_family and family != card_family:
            raise ValueError(f"{source_url}: the card says family {card_family!r}, not {family!r}")
        family = family or card_family
        if not family:
            raise ValueError(f"{source_url}: no family given and the adapter card names none (pass family=...)")
        from musiclora.config import FAMILIES

        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}; expected one of {list(FAMILIES)}")
        return check_name(family, "family")

    def _check_unique(self, name: str, family: str) -> None:
        for other in self.families():
            if other != family and self._exists(self._adapter_url(other, name)):
                raise ValueError(f"adapter name {name!r} is already used by family {other!r} in {self.url}; "
                                 "names are unique across families: pick another name")

    def _new_version(self, family: str, name: str, version: int | None) -> int:
        """Allocate a version number by claiming it (conditional create): safe under concurrent publishes.

        Raises:
            ValueError: an explicit `version` that is complete already or claimed by another publish.
            RegistryError: no free number found after `MAX_CLAIM_TRIES` tries.
        """
        if version is not None:
            self.version_url(family, name, version)  # validates the number
            if version in self.versions(family, name):
                raise ValueError(f"adapter {name!r} ({family}) already has version {version} in {self.url}; "
                                 "versions are immutable: publish a new one")
            if not self._claim(family, name, version):
                raise ValueError(f"adapter {name!r} ({family}) version {version} is claimed by another publish "
                                 f"(running, or one that died) in {self.url}: publish another number")
            return version
        existing = self.versions(family, name, complete_only=False)
        candidate = (existing[-1] if existing else 0) + 1
        for _ in range(MAX_CLAIM_TRIES):
            if self._claim(family, name, candidate):
                return candidate
            candidate += 1
        raise RegistryError(f"no free version number for {name!r} ({family}) in {self.url} "
                            f"after {MAX_CLAIM_TRIES} tries")

    def _claim(self, family: str, name: str, version: int) -> bool:
        """Create `<version>/claim.json` only if absent; True when this call created it."""
        url = join_url(self.version_url(family, name, version), CLAIM)
        data = json.dumps({"claimed_at": time.time(), "pid": os.getpid()}).encode("utf-8")
        protocol, path = split_url(url)
        if protocol == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        fs, path = get_fs(url)
        try:
            with storage_errors(url):
                fs.pipe_file(path, data, mode="create")
        except Exception as exc:
            if isinstance(exc, FileExistsError) or "condition" in str(exc).lower():
                return False  # S3 412 PreconditionFailed: another publish holds this number
            raise
        return True

    def _children(self, url: str) -> list[str]:
        fs, path = get_fs(url)
        fs.invalidate_cache()
        with storage_errors(url):
            try:
                entries = fs.ls(path, detail=True)
            except FileNotFoundError:
                return []
        return sorted(Path(e["name"].rstrip("/")).name for e in entries if e["type"] == "directory")

    def _exists(self, url: str) -> bool:
        fs, path = get_fs(url)
        fs.invalidate_cache()
        with storage_errors(url):
            return bool(fs.exists(path))

    def _read_json(self, url: str) -> dict[str, Any] | None:
        fs, path = get_fs(url)
        with storage_errors(url):
            try:
                raw = fs.cat_file(path)
            except FileNotFoundError:
                return None
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise RegistryError(f"registry object {url} is not valid JSON ({exc})") from exc

    def _write_json(self, url: str, obj: dict[str, Any]) -> None:
        """One whole-object write: a single PUT on S3; write-then-rename on a local disk."""
        data = json.dumps(obj, indent=2, sort_keys=True).encode("utf-8")
        protocol, path = split_url(url)
        if protocol == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        fs, path = get_fs(url)
        with storage_errors(url):
            fs.pipe_file(path, data)
