"""The default guest image: Debian's cloud kernel plus a busybox initramfs, built once
and cached. An image directory is complete before a symlink swap publishes it, so an
interrupted build is never mistaken for a good one."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alacrity.agent import build as agent_build

from . import initramfs
from .modules import WANTED, select

KERNEL_META = "linux-image-cloud-amd64"
# Bump when the image layout changes in a way the recipe hash cannot see.
RECIPE_VERSION = 1
_STALE_SECONDS = 24 * 3600


class ImageError(RuntimeError):
    pass


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_version: str = ""


def cache_root(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if env := os.environ.get("ALACRITY_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "alacrity"


def recipe_key() -> str:
    """What the initramfs is made of, so a changed /init or newly installed extra tool
    triggers a rebuild."""
    h = hashlib.sha256()
    h.update(f"{RECIPE_VERSION}|{KERNEL_META}|{','.join(WANTED)}".encode())
    h.update(initramfs.init_script() + initramfs.POWER_BUTTON)
    h.update(f"|agent:{agent_build.recipe()}".encode())
    for extra in initramfs.present_extras():
        h.update(f"|{extra}:{extra.stat().st_size}".encode())
    return h.hexdigest()[:12]


def _load_current(root: Path) -> GuestImage | None:
    current = root / "current"
    try:
        meta = json.loads((current / "image.json").read_text())
    except (OSError, ValueError):
        return None
    image = GuestImage(
        current.resolve() / "vmlinuz",
        current.resolve() / "initrd.img",
        meta.get("kernel_version", ""),
    )
    if meta.get("recipe") != recipe_key() or not (image.kernel.exists() and image.initrd.exists()):
        return None
    return image


def default_image(cache_dir: Path | None = None, progress: bool = True) -> GuestImage:
    """The cached image, built first if missing or out of date."""
    return build_image(cache_dir, force=False, progress=progress)


def build_image(
    cache_dir: Path | None = None, force: bool = False, progress: bool = True
) -> GuestImage:
    root = cache_root(cache_dir)
    if not force and (image := _load_current(root)):
        return image
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    with _steps(progress) as step:
        step("resolving kernel package")
        package = resolve_kernel_package()
        step(f"downloading {package}")
        deb = download(package, root / "debs")
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            step("extracting kernel")
            tree = tmp / "tree"
            _run(["dpkg-deb", "-x", str(deb), str(tree)])
            vmlinuz = _find_vmlinuz(tree)
            version = vmlinuz.name.removeprefix("vmlinuz-")
            step("resolving modules")
            modules = select(tree, version)
            out = tmp / "image"
            out.mkdir()
            shutil.copyfile(vmlinuz, out / "vmlinuz")
            step("building the guest agent")
            try:
                agent = agent_build.build(tmp / "alacrity-agent")
            except agent_build.AgentBuildError as exc:
                raise ImageError(str(exc)) from None
            step("writing initramfs")
            extras = initramfs.present_extras()
            initramfs.write_initramfs(out / "initrd.img", modules, extras, agent=agent)
            meta = {
                "kernel_version": version,
                "package": package,
                "recipe": recipe_key(),
                "modules": [m.name for m in modules],
                "extras": [str(e) for e in extras],
                "built": time.time(),
            }
            (out / "image.json").write_text(json.dumps(meta, indent=1) + "\n")
            step("installing")
            _publish(root, out, f"{version}-{meta['recipe']}-{tmp.name.removeprefix('.build-')}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    image = _load_current(root)
    if image is None:
        raise ImageError(f"image in {root} did not validate after build")
    return image


def _publish(root: Path, out: Path, name: str) -> None:
    images = root / "images"
    images.mkdir(exist_ok=True)
    final = images / name
    os.rename(out, final)
    link = root / f".current-{name}"
    os.symlink(Path("images") / name, link)
    os.replace(link, root / "current")
    # Old images may still back a running VM, so only long-unused ones go.
    for old in images.iterdir():
        if old != final and time.time() - old.stat().st_mtime > _STALE_SECONDS:
            shutil.rmtree(old, ignore_errors=True)


def _remove_stale(root: Path) -> None:
    """Leftovers of builds that were killed; a live concurrent build is younger."""
    for tmp in [*root.glob(".build-*"), *root.glob(".current-*"), *root.glob("debs/.dl-*")]:
        try:
            if time.time() - tmp.lstat().st_mtime > 3600:
                if tmp.is_symlink():
                    tmp.unlink()
                else:
                    shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def resolve_kernel_package(meta: str = KERNEL_META) -> str:
    """The versioned package behind the cloud kernel metapackage."""
    for attempt in range(2):
        res = subprocess.run(["apt-cache", "depends", meta], capture_output=True, text=True)
        if m := re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)\b", res.stdout):
            return m.group(1)
        if attempt == 0 and os.geteuid() == 0:
            _run(["apt-get", "update", "-q"])
            continue
    raise ImageError(f"apt cannot resolve {meta}: run `apt-get update` (as root) first")


def download(package: str, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    if found := sorted(debs.glob(f"{package}_*.deb")):
        return found[-1]
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=debs))
    try:
        # apt warns that the _apt sandbox user cannot write here; the download still works.
        _run(["apt-get", "download", "-q", package], cwd=tmp)
        (deb,) = tmp.glob("*.deb")
        os.rename(deb, debs / deb.name)
        return debs / deb.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _find_vmlinuz(tree: Path) -> Path:
    found = sorted((tree / "boot").glob("vmlinuz-*"))
    if not found:
        raise ImageError("kernel package has no boot/vmlinuz-*")
    return found[-1]


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
        raise ImageError(f"{' '.join(cmd)} failed ({res.returncode}): {tail[0]}")


@contextmanager
def _steps(progress: bool) -> Iterator[Callable[[str], None]]:
    from tqdm import tqdm  # here: it is slow to import, and `vm run` rarely builds

    bar = tqdm(
        total=6,
        file=sys.stderr,
        disable=not progress,
        unit="step",
        bar_format="image: {desc} [{n_fmt}/{total_fmt}] {elapsed}",
    )
    first = True

    def step(desc: str) -> None:
        nonlocal first
        if not first:
            bar.update(1)
        first = False
        bar.set_description_str(desc)

    try:
        yield step
        bar.update(1)
        bar.set_description_str("done")
    finally:
        bar.close()
