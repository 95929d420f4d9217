"""The exception hierarchy: one root, classified so the CLI and retries know what to do."""

from __future__ import annotations

from typing import Literal

__all__ = [
    "ConfigError",
    "DativoError",
    "EngineError",
    "InternalError",
    "PluginError",
    "ProtocolError",
    "SignatureError",
    "StateError",
]

Role = Literal["reader", "writer"]


class DativoError(Exception):
    """Root of every error Dativo raises on purpose.

    Attributes:
        transient: True when retrying the same run may succeed (a network blip, a busy engine).
    """

    transient: bool = False

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if transient is not None:
            self.transient = transient

    def __str__(self) -> str:
        return self.message


class ConfigError(DativoError):
    """A job file, trust policy or command-line value is wrong; the user must change it."""

    def __init__(
        self, message: str, *, source: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message, transient=False)
        self.source = source
        self.field = field


class EngineError(DativoError):
    """The container engine is missing, unreachable, or cannot enforce a required limit."""


class PluginError(DativoError):
    """A plugin failed or broke a rule of the sandbox or the protocol.

    Attributes:
        plugin: the plugin's display name (for example `reader files`).
        role: `reader` or `writer`.
        rule: short name of the rule broken (`memory`, `timeout`, `protocol`, `schema`, `crash`,
            `plugin`), so reports and tests can match on it.
        hint: the setting a user would change, if any.
        logs: the last log lines of the plugin, if captured.
    """

    def __init__(
        self,
        message: str,
        *,
        plugin: str,
        role: Role,
        rule: str,
        hint: str | None = None,
        logs: str | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(message, transient=transient)
        self.plugin = plugin
        self.role = role
        self.rule = rule
        self.hint = hint
        self.logs = logs

    def __str__(self) -> str:
        text = f"{self.role} plugin `{self.plugin}`: {self.message}"
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text


class ProtocolError(DativoError):
    """Bytes on the plugin socket do not follow protocol v1 (framing, ordering, Arrow IPC)."""


class SignatureError(DativoError):
    """A plugin image is not signed as the trust policy requires, or its signature is not valid.

    Raised before any container of the image starts (and by `dativo plugin import` before the
    image is loaded).

    Attributes:
        check: short name of the check that failed (`unsigned`, `signature`, `untrusted-key`,
            `scope`, `expired`, `revoked`, `image-mismatch`, `manifest-mismatch`, `manifest`,
            `kind`, `entrypoint`, `name`, `rollback`, `bundle`), so reports and tests can match
            on it.
        image: the image reference or ID that was checked, if any.
        plugin: the plugin's display name, when a job uses it.
        role: `reader` or `writer`, when a job uses it.
        hint: what to do about it.
    """

    def __init__(
        self,
        message: str,
        *,
        check: str,
        image: str | None = None,
        plugin: str | None = None,
        role: Role | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, transient=False)
        self.check = check
        self.image = image
        self.plugin = plugin
        self.role = role
        self.hint = hint

    def __str__(self) -> str:
        text = self.message
        if self.role and self.plugin:
            text = f"{self.role} plugin `{self.plugin}`: {text}"
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text


class StateError(DativoError):
    """The incremental state store cannot be read or written."""


class InternalError(DativoError):
    """A bug in Dativo itself; please report it."""
