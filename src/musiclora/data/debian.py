"""Debian's music data packages: fetching them without installing, and reading their licences.

Each package is fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into a cache
folder (nothing is installed on the system); its licence is read from the package's own
``usr/share/doc/<package>/copyright``. Needs Debian's ``apt-get`` and ``dpkg`` with package
lists present (``apt-get update`` once).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(".musiclora/cache/corpus")
_MARKER = ".musiclora-package.json"

@dataclass(frozen=True)
class PackageInfo:
    """One Debian package unpacked in the cache.

    Attributes:
        package: Debian package name.
        version: Debian version string.
        description: the package's one-line description.
        section: Debian section (e.g. "games").
        licence: licence read from the package's copyright file (SPDX-like, e.g. "GPL-2+").
        root: folder the package was unpacked into (absolute).
        deb_bytes: size of the downloaded .deb in bytes.
        download_s: seconds ``apt-get download`` took (when it was fetched).
        extract_s: seconds ``dpkg -x`` took (when it was fetched).
        cached: True when this call found it already unpacked and fetched nothing.
    """

    package: str
    version: str
    description: str
    section: str
    licence: str
    root: Path
    deb_bytes: int
    download_s: float
    extract_s: float
    cached: bool = False

    @property
    def copyright_file(self) -> Path:
        """Path of the package's Debian copyright file (may not exist)."""
        return self.root / "usr" / "share" / "doc" / self.package / "copyright"



# --------------------------------------------------------------------------- licences


def _earliest(*hits: tuple[int, str] | None) -> str | None:
    found = [h for h in hits if h is not None]
    return min(found)[1] if found else None


def _dep5_licence(text: str) -> str | None:
    """First ``License:`` of a machine-readable (DEP-5) copyright file, preferring ``Files: *``."""
    if not re.match(r"\s*Format:\s*\S*copyright-format", text):
        return None
    for stanza in re.split(r"\n\s*\n", text):
        if re.search(r"^Files:\s*\*\s*$", stanza, re.MULTILINE):
            m = re.search(r"^License:\s*(\S.*)$", stanza, re.MULTILINE)
            if m:
                return m.group(1).strip()
    m = re.search(r"^License:\s*(\S.*)$", text, re.MULTILINE)
    return m.group(1).strip() if m else None


def _cc_licence(flat: str) -> tuple[int, str] | None:
    m = re.search(r"creativecommons\.org/licenses/([a-z-]+)/(\d\.\d)", flat, re.IGNORECASE)
    if m:
        return m.start(), f"CC-{m.group(1).upper()}-{m.group(2)}"
    m = re.search(r"creative commons", flat, re.IGNORECASE)
    if not m:
        return None
    codes = {"attribution": "BY", "noncommercial": "NC", "noderivs": "ND", "sharealike": "SA"}
    el = re.search(r"title of this License:\s*([A-Za-z, -]+)\.", flat)
    parts = [codes[w] for w in re.findall(r"[A-Za-z]+", el.group(1).lower()) if w in codes] if el else []
    ver = re.search(r"\bAttribution[A-Za-z-]*\s+(\d\.\d)\b", flat)
    name = "CC-" + "-".join(parts or ["BY"]) + (f"-{ver.group(1)}" if ver else "")
    return m.start(), name


def _gpl_licence(flat: str) -> tuple[int, str] | None:
    m = re.search(
        r"GNU (Lesser |Library )?General Public License(.{0,120}?)version (\d)(.{0,80})", flat, re.IGNORECASE
    )
    if not m:
        return None
    kind = "LGPL" if m.group(1) else "GPL"
    later = re.search(r"later version", m.group(4), re.IGNORECASE)
    return m.start(), f"{kind}-{m.group(3)}{'+' if later else ''}"


def detect_licence(text: str) -> str:
    """Name the main licence of a Debian copyright file.

    A machine-readable (DEP-5) file gives the ``License:`` of its ``Files: *`` stanza. Otherwise
    the earliest-mentioned of Creative Commons (elements and version from the legal code) and
    GNU (L)GPL (version, "+" for "or any later version") wins, so a trailing note about the
    Debian packaging's own licence does not mask the work's.

    Args:
        text: the copyright file's contents.

    Returns:
        An SPDX-like name such as "CC-BY-SA-3.0" or "GPL-2+", or "unknown".
    """
    dep5 = _dep5_licence(text)
    if dep5:
        return dep5
    flat = " ".join(text.split())
    return _earliest(_cc_licence(flat), _gpl_licence(flat)) or "unknown"

# --------------------------------------------------------------------------- fetching


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"{what}: `{cmd[0]}` not found; building a corpus needs Debian's apt-get and dpkg")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise RuntimeError(f"{what}: `{' '.join(cmd)}` failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def _deb_fields(deb: Path) -> dict[str, str]:
    out = _run(
        ["dpkg-deb", "-f", str(deb), "Version", "Description", "Section"], deb.parent, f"reading {deb}"
    )
    fields = {}
    for line in out.splitlines():
        if ":" in line and not line.startswith(" "):
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    return fields


def fetch_package(package: str, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> PackageInfo:
    """Download a Debian package and unpack it under ``<cache_dir>/packages/<package>``.

    Idempotent: an already unpacked package (its marker file present) is not fetched again.
    Unpacking goes to a temporary folder renamed into place, so an interrupted run leaves no
    half-unpacked package behind. The .deb is deleted after unpacking.

    Args:
        package: Debian package name, e.g. "singularity-music".
        cache_dir: cache root.

    Returns:
        The package's info; `cached` says whether anything was fetched.

    Raises:
        RuntimeError: if apt-get or dpkg is missing or fails (unknown package, no package lists:
            run ``apt-get update``), naming the package.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", package):
        raise ValueError(f"not a Debian package name: {package!r}")
    packages_dir = Path(cache_dir).absolute() / "packages"
    root = packages_dir / package
    marker = root / _MARKER
    if marker.is_file():
        meta = json.loads(marker.read_text())
        meta.update(root=root, cached=True)
        return PackageInfo(**meta)
    packages_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=packages_dir, prefix=f".{package}.") as tmp:
        tmp_path = Path(tmp)
        cmd = ["apt-get", "download", package]
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # root: apt's _apt user cannot write here
            cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
        t0 = time.perf_counter()
        _run(cmd, tmp_path, f"downloading Debian package {package!r}")
        download_s = time.perf_counter() - t0
        debs = sorted(tmp_path.glob("*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"downloading Debian package {package!r}: expected one .deb, got {debs}")
        deb = debs[0]
        fields = _deb_fields(deb)
        unpacked = tmp_path / "root"
        t0 = time.perf_counter()
        _run(["dpkg", "-x", str(deb), str(unpacked)], tmp_path, f"unpacking Debian package {package!r}")
        extract_s = time.perf_counter() - t0
        copyright_file = unpacked / "usr" / "share" / "doc" / package / "copyright"
        licence = (
            detect_licence(copyright_file.read_text(errors="replace"))
            if copyright_file.is_file()
            else "unknown"
        )
        meta = {
            "package": package,
            "version": fields.get("Version", ""),
            "description": fields.get("Description", ""),
            "section": fields.get("Section", ""),
            "licence": licence,
            "deb_bytes": deb.stat().st_size,
            "download_s": round(download_s, 3),
            "extract_s": round(extract_s, 3),
        }
        (unpacked / _MARKER).write_text(json.dumps(meta, indent=1))
        if marker.is_file():  # another process finished the same package meanwhile
            return fetch_package(package, cache_dir)
        if root.exists():  # a marker-less leftover of an interrupted older run
            shutil.rmtree(root)
        os.replace(unpacked, root)
    log.info(
        "%s %s: downloaded %.1f MiB in %.1f s, unpacked in %.1f s, licence %s",
        package, meta["version"], meta["deb_bytes"] / 2**20, download_s, extract_s, licence,
    )  # fmt: skip
    return PackageInfo(**meta, root=root)
