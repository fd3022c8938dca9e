"""Build the service image without an image registry: a Debian bookworm base made by
``debootstrap`` (python3, its venv module, CA certificates), imported into buildah's storage,
then ``buildah bud --isolation chroot`` of the project's Dockerfile on it.

The base is cached twice: as an image in buildah's storage (``BASE_TAG``) and as a root file
system tarball under ``cache_dir()`` (``PRICING_IMAGE_CACHE``, default
``/var/tmp/crowd-pricing-image``, outside the clone, so every test and every clone of one CI
run share it). Only a machine with neither runs debootstrap (~1 min here).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE_TAG = "localhost/crowd-pricing-base:bookworm"
SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def cache_dir() -> Path:
    return Path(os.environ.get("PRICING_IMAGE_CACHE", "/var/tmp/crowd-pricing-image"))


def missing_tools() -> list[str]:
    return [t for t in ("buildah", "debootstrap") if shutil.which(t) is None]


def run(*args: str, timeout: float = 900) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def debian_mirror() -> str:
    """The Debian archive this machine's apt uses (``PRICING_DEBIAN_MIRROR`` overrides)."""
    explicit = os.environ.get("PRICING_DEBIAN_MIRROR")
    if explicit:
        return explicit
    sources = [*Path("/etc/apt/sources.list.d").glob("*.sources"), Path("/etc/apt/sources.list")]
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.MULTILINE):  # deb822
            if "security" not in m.group(1):
                return m.group(1)
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", text, re.MULTILINE):
            if "security" not in m.group(1):
                return m.group(1)
    raise RuntimeError("no Debian mirror in /etc/apt: set PRICING_DEBIAN_MIRROR")


def image_exists(tag: str) -> bool:
    return (
        subprocess.run(
            ["buildah", "inspect", "--type", "image", tag], capture_output=True, check=False
        ).returncode
        == 0
    )


def rootfs_tarball() -> Path:
    """The debootstrapped root file system as a tarball (made once, then cached)."""
    tarball = cache_dir() / f"{SUITE}-python3.tar"
    if tarball.exists():
        return tarball
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        root = Path(tmp) / "root"
        run(
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(root),
            debian_mirror(),
            timeout=1800,
        )
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (root / leftover).glob("*"):
                if f.is_file():
                    f.unlink()
        if HOST_CA.is_file():  # the CAs this machine trusts (pip reaches PyPI through them)
            shutil.copy(HOST_CA, root / "etc/ssl/certs/ca-certificates.crt")
        partial = tarball.with_suffix(".partial")
        run("tar", "-C", str(root), "-cf", str(partial), ".")
        partial.rename(tarball)
    return tarball


def ensure_base() -> str:
    """The base image's tag, imported into buildah's storage if it is not there yet."""
    if image_exists(BASE_TAG):
        return BASE_TAG
    tarball = rootfs_tarball()
    ctr = run("buildah", "from", "scratch").strip()
    try:
        mnt = run("buildah", "mount", ctr).strip()
        run("tar", "-C", mnt, "-xf", str(tarball))
        run("buildah", "umount", ctr)
        run("buildah", "commit", "-q", ctr, BASE_TAG)
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True, check=False)
    return BASE_TAG


def build_image(tag: str, *, base: str, extras: str = "parquet") -> float:
    """``buildah bud`` of the project's Dockerfile on ``base``; returns the seconds it took."""
    started = time.monotonic()
    run(
        "buildah",
        "bud",
        "--isolation",
        "chroot",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--build-arg",
        f"EXTRAS={extras}",
        "-t",
        tag,
        str(ROOT),
        timeout=1800,
    )
    return time.monotonic() - started


def image_config(tag: str, field: str) -> str:
    return run("buildah", "inspect", "--type", "image", "--format", f"{{{{{field}}}}}", tag).strip()
