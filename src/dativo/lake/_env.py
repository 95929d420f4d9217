"""`${ENV_VAR}` references and the AWS settings taken from the environment.

Credentials themselves are never read here: pyarrow's S3 filesystem (and boto3) find them
through the usual AWS chain (environment variables, shared profile, instance role). Only the
endpoint (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, for S3-compatible servers) and the
region (`AWS_REGION` or `AWS_DEFAULT_REGION`, default `us-east-1`) are looked up.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from dativo.errors import ConfigError

__all__ = ["Redactor", "aws_settings", "expand_env"]

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Redactor:
    """Remembers expanded secret values and masks them in any text shown to a person."""

    def __init__(self) -> None:
        self._values: set[str] = set()

    def add(self, value: str) -> None:
        if len(value) >= 3:
            self._values.add(value)

    def __call__(self, text: str) -> str:
        for value in sorted(self._values, key=len, reverse=True):
            text = text.replace(value, "***")
        return text


def expand_env(
    value: str,
    *,
    field: str,
    environ: Mapping[str, str] | None = None,
    redactor: Redactor | None = None,
) -> str:
    """`value` with each `${NAME}` replaced by the environment variable's value.

    Raises:
        ConfigError: a referenced variable is not set (the message names it, not a value).
    """
    env = os.environ if environ is None else environ

    def replace(match: re.Match[str]) -> str:
        name = match[1]
        if name not in env:
            raise ConfigError(
                f"`{field}` refers to the environment variable `{name}`, which is not set; "
                "set it for the supervisor (`dativo run`)",
                field=field,
            )
        if redactor is not None:
            redactor.add(env[name])
        return env[name]

    return _REF.sub(replace, value)


def aws_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`endpoint` (when set) and `region` for S3 clients, from the environment."""
    env = os.environ if environ is None else environ
    settings = {
        "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
    }
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        settings["endpoint"] = endpoint
    return settings
