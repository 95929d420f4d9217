"""A throw-away SoftHSM2 token for the PKCS#11 tests (one per session: the PKCS#11 library
reads `SOFTHSM2_CONF` once, when it is first initialised in a process)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import in_ci

MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
TOKEN = "dativo-test"
PIN = "246810"
PIN_ENV = "DATIVO_TEST_HSM_PIN"


def _session(module: Path, token_label: str) -> Any:
    """A read-write session, logged in (or reusing this process's login)."""
    import pkcs11
    from pkcs11.exceptions import UserAlreadyLoggedIn

    token = pkcs11.lib(str(module)).get_token(token_label=token_label)
    try:
        return token.open(user_pin=PIN, rw=True)
    except UserAlreadyLoggedIn:
        return token.open(rw=True)


@dataclass(frozen=True)
class SoftHsm:
    module: Path
    token: str
    pin_env: str

    def add_key(self, label: str) -> None:
        """Create an AES-256 key object labelled `label` on the token."""
        from pkcs11 import KeyType

        with _session(self.module, self.token) as session:
            session.generate_key(KeyType.AES, 256, label=label, store=True)

    def set_usage(self, label: str, *, encrypt: bool, decrypt: bool) -> None:
        from pkcs11 import Attribute, ObjectClass

        with _session(self.module, self.token) as session:
            key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
            key[Attribute.ENCRYPT] = encrypt
            key[Attribute.DECRYPT] = decrypt

    def remove_key(self, label: str) -> None:
        from pkcs11 import ObjectClass

        with _session(self.module, self.token) as session:
            session.get_key(object_class=ObjectClass.SECRET_KEY, label=label).destroy()

    def service(self) -> dict[str, str]:
        """The job file's `key_service` block for this token."""
        return {
            "type": "pkcs11",
            "module": str(self.module),
            "token": self.token,
            "pin": f"${{{self.pin_env}}}",
        }


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """A fresh SoftHSM2 token in a temporary directory; fails under CI=true when SoftHSM2 is
    missing (`make softhsm` installs it), skips otherwise."""
    module = next((Path(m).resolve() for m in MODULES if Path(m).is_file()), None)
    tool = shutil.which("softhsm2-util")
    if module is None or tool is None:
        message = "SoftHSM2 is not installed; run `make softhsm` (apt-get install softhsm2)"
        if in_ci():
            pytest.fail(f"{message} [CI=true: never skipped]", pytrace=False)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ[PIN_ENV] = PIN
    subprocess.run(
        [tool, "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", "13579"],
        check=True,
        capture_output=True,
    )
    yield SoftHsm(module=module, token=TOKEN, pin_env=PIN_ENV)
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous
