"""The built-in plugin image: present, importable when hardened, unprivileged, offline.

Built by `make images` (sandbox/build_images.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]

# How Dativo runs plugin containers, minus the socket mount.
HARDENED = [
    "--network",
    "none",
    "--read-only",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges:true",
    "--user",
    "65534:65534",
]


def project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def run_in(
    image: str, *args: str, options: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`docker run --rm` a command (args[0] is the entrypoint) in the image."""
    entrypoint, *rest = args
    return docker(
        "run", "--rm", "--pull", "never", *(options or []), "--entrypoint", entrypoint, image, *rest
    )


@pytest.fixture(scope="module")
def plugin_image(docker_engine: str) -> str:
    """The built-in plugin image's tag (DATIVO_PYTHON_IMAGE overrides it)."""
    tag = os.environ.get("DATIVO_PYTHON_IMAGE") or f"dativo/plugin-python:{project_version()}"
    proc = docker("image", "inspect", tag)
    if proc.returncode != 0:
        pytest.fail(f"image {tag} does not exist: run `make images`", pytrace=False)
    return tag


def inspect(image: str) -> dict[str, object]:
    proc = docker("image", "inspect", image)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)[0]
    assert isinstance(data, dict)
    return data


def test_plugin_image_is_labelled_and_unprivileged(plugin_image: str) -> None:
    config = inspect(plugin_image)["Config"]
    assert isinstance(config, dict)
    labels = config.get("Labels") or {}
    assert labels.get("org.dativo.builtin") == "true"
    assert labels.get("org.dativo.version") == project_version()
    assert config.get("User") == "65534:65534"
    assert config.get("Entrypoint") == ["python3", "-m", "dativo.host"]


def test_imports_work_in_a_hardened_container(plugin_image: str) -> None:
    proc = run_in(
        plugin_image,
        "python3",
        "-c",
        "import dativo, pyarrow; print(dativo.__version__, pyarrow.__version__)",
        options=HARDENED,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == project_version()


def test_runs_as_nobody_by_default(plugin_image: str) -> None:
    proc = run_in(
        plugin_image,
        "python3",
        "-c",
        "import os; print(os.getuid(), os.getgid(), *os.getgroups())",
        options=["--network", "none"],
    )
    assert proc.returncode == 0, proc.stderr
    uid, gid, *groups = proc.stdout.split()
    assert (uid, gid) == ("65534", "65534")
    assert set(groups) <= {"65534"}, f"supplementary groups: {groups}"


def test_no_setuid_or_setgid_files(plugin_image: str) -> None:
    # As root so that find can read every directory; -xdev stays off /proc etc.
    proc = run_in(
        plugin_image,
        "find",
        "/",
        "-xdev",
        "-type",
        "f",
        "-perm",
        "/6000",
        options=["--network", "none", "--user", "0:0"],
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [], f"setuid/setgid files: {proc.stdout}"


def test_package_index_is_unreachable(plugin_image: str) -> None:
    options = [*HARDENED, "--tmpfs", "/tmp:rw,size=64m", "--env", "HOME=/tmp"]
    pip = run_in(
        plugin_image,
        "python3",
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--retries",
        "0",
        "--timeout",
        "5",
        "--dest",
        "/tmp/dl",
        "six",
        options=options,
    )
    assert pip.returncode != 0, f"pip reached an index:\n{pip.stdout}"
    assert "Saved" not in pip.stdout
    # Not pip's configuration: the container has no route anywhere.
    probe = run_in(
        plugin_image,
        "python3",
        "-c",
        "import socket\n"
        "for host in ('pypi.org', '1.1.1.1'):\n"
        "    try:\n"
        "        socket.create_connection((host, 443), timeout=5).close()\n"
        "    except OSError as exc:\n"
        "        print(host, 'unreachable:', type(exc).__name__)\n"
        "    else:\n"
        "        print(host, 'REACHABLE')\n",
        options=options,
    )
    assert probe.returncode == 0, probe.stderr
    assert "REACHABLE" not in probe.stdout, probe.stdout
    assert probe.stdout.count("unreachable") == 2, probe.stdout
