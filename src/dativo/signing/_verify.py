"""Detached signatures over image ID + manifest: signing, and verification before every run."""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dativo.config import format_duration, format_size
from dativo.errors import ConfigError, Role, SignatureError
from dativo.signing._keys import (
    KEY_ID_RE,
    PrivateKey,
    PublicKey,
    format_time,
    parse_time,
    utc_now,
)
from dativo.signing._manifest import (
    LABEL_MANIFEST,
    MAX_MANIFEST_BYTES,
    RESOURCE_FIELDS,
    Manifest,
    ManifestError,
    Version,
    canonical_json,
    loads_strict,
    manifest_digest,
    network_allows,
    parse_manifest,
)
from dativo.signing._trust import TrustStore, load_trust, signatures_dir

__all__ = [
    "SIGNATURE_TYPE",
    "Grants",
    "ImageFacts",
    "ImageLike",
    "SignatureCheck",
    "SignatureFile",
    "VerifiedPlugin",
    "check_signatures",
    "image_manifest",
    "read_signature_files",
    "sign_image",
    "verify_plugin",
]

SIGNATURE_TYPE = "dativo.plugin-signature.v1"
MAX_SIGNATURE_BYTES = 512 * 1024
_IMAGE_ID_LENGTH = len("sha256:") + 64


class ImageLike(Protocol):
    """What verification needs to know about an image, from the engine or a bundle."""

    @property
    def id(self) -> str: ...

    @property
    def labels(self) -> Mapping[str, str]: ...

    @property
    def entrypoint(self) -> tuple[str, ...] | None: ...

    @property
    def cmd(self) -> tuple[str, ...] | None: ...

    @property
    def repo_digests(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class ImageFacts:
    """An image's ID and the parts of its config that verification reads."""

    id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    repo_digests: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, image_id: str, config: Mapping[str, Any]) -> ImageFacts:
        """From an image config document (`docker save`'s `<id>.json`) and its digest."""
        inner = config.get("config") or {}
        if not isinstance(inner, Mapping):
            inner = {}
        return cls(
            id=image_id,
            labels=dict(inner.get("Labels") or {}),
            entrypoint=_strings(inner.get("Entrypoint")),
            cmd=_strings(inner.get("Cmd")),
        )


def _strings(value: object) -> tuple[str, ...] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def _short(image_id: str) -> str:
    return image_id[: len("sha256:") + 12]


def image_command(image: ImageLike) -> tuple[str, ...]:
    return (image.entrypoint or ()) + (image.cmd or ())


def image_manifest(image: ImageLike) -> tuple[dict[str, Any], Manifest] | None:
    """The image's manifest label, raw and parsed; None if it has none.

    Raises:
        ManifestError: the label is there but is not a valid manifest.
    """
    text = image.labels.get(LABEL_MANIFEST)
    if text is None:
        return None
    if len(text.encode()) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"larger than {format_size(MAX_MANIFEST_BYTES)}")
    raw = loads_strict(text)
    return raw, parse_manifest(raw)


@dataclass(frozen=True)
class SignatureFile:
    """One detached signature: a payload and the Ed25519 signature of its exact bytes."""

    key_id: str
    payload: bytes
    signature: bytes
    source: str

    def to_bytes(self) -> bytes:
        return (
            canonical_json(
                {
                    "key_id": self.key_id,
                    "payload": base64.b64encode(self.payload).decode(),
                    "signature": base64.b64encode(self.signature).decode(),
                }
            )
            + b"\n"
        )

    @classmethod
    def parse(cls, data: bytes, source: str) -> SignatureFile:
        """Decode a signature file; the payload stays bytes (it is verified before parsing).

        Raises:
            ManifestError: the file is not a signature file.
        """
        if len(data) > MAX_SIGNATURE_BYTES:
            raise ManifestError("larger than any signature file")
        doc = loads_strict(data)
        if not isinstance(doc, dict) or set(doc) != {"key_id", "payload", "signature"}:
            raise ManifestError("expected exactly `key_id`, `payload` and `signature`")
        key_id = doc["key_id"]
        if not isinstance(key_id, str) or not KEY_ID_RE.fullmatch(key_id):
            raise ManifestError("`key_id` is not 16 lowercase hex digits")
        try:
            payload = base64.b64decode(str(doc["payload"]), validate=True)
            signature = base64.b64decode(str(doc["signature"]), validate=True)
        except (binascii.Error, ValueError):
            raise ManifestError("`payload` or `signature` is not base64") from None
        return cls(key_id, payload, signature, source)


def read_signature_files(directory: Path) -> list[SignatureFile | tuple[str, str]]:
    """Every `*.sig.json` in `directory`; unreadable ones as (path, reason)."""
    found: list[SignatureFile | tuple[str, str]] = []
    try:
        entries = sorted(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return found
    for path in entries:
        if not path.name.endswith(".sig.json"):
            continue
        try:
            # O_NOFOLLOW: a signature directory is data, never a pointer elsewhere.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as handle:
                data = handle.read(MAX_SIGNATURE_BYTES + 1)
            found.append(SignatureFile.parse(data, str(path)))
        except (OSError, ManifestError) as exc:
            found.append((str(path), f"unreadable signature file: {exc}"))
    return found


def sign_image(
    image: ImageLike, key: PrivateKey, *, signed_at: str | None = None
) -> tuple[SignatureFile, Manifest]:
    """Sign `image`'s ID and manifest label with `key`.

    Raises:
        SignatureError: the image has no valid manifest, or its entrypoint differs from it.
    """
    try:
        found = image_manifest(image)
    except ManifestError as exc:
        raise SignatureError(
            f"image {_short(image.id)}… has an invalid `{LABEL_MANIFEST}` label: {exc}",
            check="manifest",
            image=image.id,
            hint="fix the manifest and rebuild the image; only a valid manifest can be signed",
        ) from None
    if found is None:
        raise SignatureError(
            f"image {_short(image.id)}… has no `{LABEL_MANIFEST}` label; a signature covers the "
            "image and its manifest, so there is nothing to sign",
            check="manifest",
            image=image.id,
            hint=f"add `LABEL {LABEL_MANIFEST}='<manifest JSON>'` to the Dockerfile (see "
            "docs/air-gapped.md)",
        )
    raw, manifest = found
    if image_command(image) != manifest.entrypoint:
        raise SignatureError(
            f"the image runs `{list(image_command(image))}` but its manifest declares "
            f"`{list(manifest.entrypoint)}`",
            check="entrypoint",
            image=image.id,
            hint="make the manifest's `entrypoint` equal the image's ENTRYPOINT + CMD",
        )
    payload = {
        "type": SIGNATURE_TYPE,
        "image_id": image.id,
        "manifest": raw,
        "manifest_digest": manifest_digest(raw),
        "signed_at": signed_at or format_time(utc_now()),
    }
    data = canonical_json(payload)
    return SignatureFile(key.key_id, data, key.sign(data), "<new>"), manifest


@dataclass(frozen=True)
class SignatureCheck:
    """The outcome of checking one signature file (for `dativo plugin inspect`)."""

    source: str
    key_id: str | None
    publisher: str | None
    valid: bool
    check: str
    reason: str
    signed_at: str | None = None


@dataclass(frozen=True)
class _Accepted:
    signature: SignatureFile
    key: PublicKey
    publisher: str
    signed_at: str


def _check_one(
    sig: SignatureFile,
    image: ImageLike,
    raw_manifest: dict[str, Any],
    manifest: Manifest,
    trust: TrustStore,
) -> _Accepted | SignatureCheck:
    """Steps 4 to 6 for one signature file."""

    def bad(check: str, reason: str, publisher: str | None = None) -> SignatureCheck:
        return SignatureCheck(sig.source, sig.key_id, publisher, False, check, reason)

    # 4a. The key must be in the trust store; an unknown key proves nothing.
    key = trust.keys.get(sig.key_id)
    publisher = trust.policy.publisher_of(sig.key_id)
    if key is None:
        return bad(
            "untrusted-key",
            f"it was made with key `{sig.key_id}`, which is not in the trust store "
            f"`{trust.keys_dir}`",
        )
    if publisher is None:
        return bad(
            "untrusted-key",
            f"key `{sig.key_id}` ({key.publisher}) is in the trust store but no publisher in "
            f"`{trust.policy_path}` lists it",
        )
    # 4b. Revocation wins over everything else.
    if sig.key_id in trust.policy.revoked_keys:
        return bad(
            "revoked",
            f"key `{sig.key_id}` of publisher `{publisher.name}` is revoked in "
            f"`{trust.policy_path}`",
            publisher.name,
        )
    # 4c. Expiry: a key past its `expires_at` signs nothing any more.
    if key.expired():
        assert key.expires_at is not None
        return bad(
            "expired",
            f"key `{sig.key_id}` of publisher `{publisher.name}` expired at "
            f"{format_time(key.expires_at)}",
            publisher.name,
        )
    # 4d. The signature over the exact payload bytes, before a single byte of it is parsed.
    if not key.verify(sig.signature, sig.payload):
        return bad(
            "signature",
            f"the signature does not verify with key `{sig.key_id}` of publisher "
            f"`{publisher.name}`: the signature or its payload was altered",
            publisher.name,
        )
    # 5. The payload, now authentic: it must name this very image and this very manifest.
    try:
        payload = loads_strict(sig.payload)
    except ManifestError as exc:
        return bad("signature", f"the signed payload is not JSON ({exc})", publisher.name)
    if not isinstance(payload, dict) or payload.get("type") != SIGNATURE_TYPE:
        return bad("signature", f"the payload is not a `{SIGNATURE_TYPE}`", publisher.name)
    if payload.get("image_id") != image.id:
        signed_for = str(payload.get("image_id"))[:_IMAGE_ID_LENGTH]
        return bad(
            "image-mismatch",
            f"it was made for image `{_short(signed_for)}…`, not this image "
            f"`{_short(image.id)}…`: the signature was copied from another image, or the image "
            "was rebuilt after signing",
            publisher.name,
        )
    signed_manifest = payload.get("manifest")
    if not isinstance(signed_manifest, dict) or canonical_json(signed_manifest) != canonical_json(
        raw_manifest
    ):
        changed = _changed_fields(signed_manifest, raw_manifest)
        return bad(
            "manifest-mismatch",
            "the image's manifest differs from the signed manifest"
            + (f" (changed: {', '.join(changed)})" if changed else "")
            + ": it was edited after signing",
            publisher.name,
        )
    if payload.get("manifest_digest") != manifest_digest(raw_manifest):
        return bad("manifest-mismatch", "the signed manifest digest is wrong", publisher.name)
    try:
        signed_at = parse_time(payload.get("signed_at"))
    except ValueError as exc:
        return bad("signature", f"`signed_at`: {exc}", publisher.name)
    if key.expires_at is not None and signed_at >= key.expires_at:
        return bad("expired", "it was made after its key expired", publisher.name)
    # 6. Scope: the key's publisher must be allowed to sign this plugin name.
    if not publisher.may_sign(manifest.name):
        return bad(
            "scope",
            f"key `{sig.key_id}` belongs to publisher `{publisher.name}`, which the policy "
            f"`{trust.policy_path}` allows to sign {', '.join(f'`{p}`' for p in publisher.plugins)}"
            f" only, not `{manifest.name}`",
            publisher.name,
        )
    return _Accepted(sig, key, publisher.name, format_time(signed_at))


def _changed_fields(signed: object, actual: Mapping[str, Any]) -> list[str]:
    if not isinstance(signed, dict):
        return []
    names = sorted(set(signed) | set(actual))
    return [n for n in names if canonical_json(signed.get(n)) != canonical_json(actual.get(n))]


def check_signatures(
    image: ImageLike,
    raw_manifest: dict[str, Any],
    manifest: Manifest,
    signatures: Sequence[SignatureFile | tuple[str, str]],
    trust: TrustStore,
) -> tuple[_Accepted | None, list[SignatureCheck]]:
    """Check every signature; return the first accepted one (if any) and every outcome."""
    accepted: _Accepted | None = None
    outcomes: list[SignatureCheck] = []
    for sig in signatures:
        if isinstance(sig, tuple):
            outcomes.append(SignatureCheck(sig[0], None, None, False, "signature", sig[1]))
            continue
        result = _check_one(sig, image, raw_manifest, manifest, trust)
        if isinstance(result, _Accepted):
            outcomes.append(
                SignatureCheck(
                    sig.source,
                    sig.key_id,
                    result.publisher,
                    True,
                    "ok",
                    "valid",
                    result.signed_at,
                )
            )
            accepted = accepted or result
        else:
            outcomes.append(result)
    return accepted, outcomes


@dataclass(frozen=True)
class Grants:
    """What a job asks for a plugin: network destinations and resources.

    Attributes:
        network: `host:port` destinations the job grants.
        resources: the job's `cpus`, `memory`, `pids`, `timeout`.
        explicit: which of those the job set itself (the others take the manifest's defaults).
        field_path: `source.reader` or `target.writer`, for messages.
    """

    network: tuple[str, ...] = ()
    resources: Mapping[str, float] = field(default_factory=dict)
    explicit: frozenset[str] = frozenset()
    field_path: str = "plugin"


@dataclass(frozen=True)
class VerifiedPlugin:
    """An image that passed verification: run it by `image_id`, with `resources`."""

    image_id: str
    manifest: Manifest | None
    key_id: str | None
    publisher: str | None
    signed: bool
    signed_at: str | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def report(self) -> dict[str, Any]:
        """The run report's view of the verification."""
        return {
            "signed": self.signed,
            "publisher": self.publisher,
            "key_id": self.key_id,
            "manifest": None
            if self.manifest is None
            else {"name": self.manifest.name, "version": self.manifest.version},
            "verify_seconds": round(self.seconds, 6),
        }


def _fmt(name: str, value: float) -> str:
    if name == "memory":
        return format_size(int(value))
    if name == "timeout":
        return format_duration(value)
    return f"{value:g}"


def verify_plugin(
    image: ImageLike,
    *,
    role: Role,
    grants: Grants,
    trust: TrustStore | None = None,
    reference: str | None = None,
    plugin: str | None = None,
    expected_name: str | None = None,
    local_code: bool = False,
) -> VerifiedPlugin:
    """Decide whether `image` may run as the `role` plugin of a job; fail closed.

    Args:
        image: the engine's view of the image (its ID, labels, entrypoint).
        role: `reader` or `writer`, as the job uses it.
        grants: what the job grants the plugin.
        trust: the trust store; loaded from `$DATIVO_HOME` when None.
        reference: how the job names the image, for messages.
        plugin: the plugin's display name, for messages.
        expected_name: the manifest name the job requires (the built-ins are `dativo/<name>`).
        local_code: the plugin is local code mounted into a runtime image (`type: python`):
            never signed, allowed only by `allow_unsigned_local`.

    Returns:
        The verified image ID, manifest, key and publisher, and the resources to run with.

    Raises:
        SignatureError: the image may not run; the message says which check failed and how
            to fix it.
        ConfigError: the trust store or policy is malformed, or the job grants more than the
            signed manifest declares.
    """
    started = time.perf_counter()
    shown = reference or image.id

    def refuse(check: str, message: str, hint: str | None = None) -> SignatureError:
        return SignatureError(
            message, check=check, image=image.id, plugin=plugin, role=role, hint=hint
        )

    # 1. The trust store and policy, loaded and validated as a whole: a malformed file refuses
    #    every run (ConfigError naming the file and field).
    if trust is None:
        trust = load_trust()
    policy_file = trust.policy_path

    # 2. The image ID (the digest of its config, never a tag) and the manifest label inside
    #    that config. An invalid manifest refuses the run; a missing one leaves the image
    #    unsigned.
    image_id = image.id
    if not (image_id.startswith("sha256:") and len(image_id) == _IMAGE_ID_LENGTH):
        raise refuse("image", f"the engine gave `{image_id[:80]}`, not a sha256 image ID")
    try:
        found = image_manifest(image)
    except ManifestError as exc:
        raise refuse(
            "manifest",
            f"image `{shown}` has an invalid `{LABEL_MANIFEST}` label: {exc}",
            "rebuild the image with a valid manifest and sign it again",
        ) from None

    # 3. The detached signatures stored for exactly this image ID.
    sig_dir = signatures_dir(trust.home, image_id)
    signatures = [] if local_code else read_signature_files(sig_dir)
    accepted: _Accepted | None = None
    outcomes: list[SignatureCheck] = []
    if found is not None and signatures:
        # 4-6. Each signature: trusted key, not revoked, not expired, Ed25519 over the exact
        #      payload bytes, then the payload names this image ID and this manifest, then the
        #      publisher may sign this plugin name. One signature passing them all suffices.
        accepted, outcomes = check_signatures(image, found[0], found[1], signatures, trust)

    if accepted is None:
        # 3b. No valid signature. Only an explicit, loudly labelled policy switch lets such an
        #     image run, and only if it was built on this machine (pulled images have digests).
        unsigned_hint = (
            f"sign it with `dativo plugin sign {shown} --key KEY.key`, or import it from a "
            "signed bundle with `dativo plugin import`"
        )
        if outcomes:
            reasons = "; ".join(f"{Path(o.source).name}: {o.reason}" for o in outcomes)
            check = outcomes[0].check if len(outcomes) == 1 else "signature"
            raise refuse(
                check,
                f"image `{shown}` ({_short(image_id)}…) has no valid signature: {reasons}",
                _hint_for(check, trust, unsigned_hint),
            )
        if not trust.policy.allow_unsigned_local:
            local_hint = (
                "`dativo trust allow-unsigned-local on` (sets `allow_unsigned_local: true` in "
                f"`{policy_file}`; every such run is labelled UNSIGNED)"
            )
            if local_code:
                raise refuse(
                    "unsigned",
                    f"this is local code (`type: python`, run in image `{shown}`) that nobody "
                    "signed; unsigned plugins are refused",
                    f"for local development only, {local_hint}; otherwise package the plugin "
                    "as a signed image",
                )
            what = (
                f"has no signature (nothing in `{sig_dir}`)"
                if found is not None
                else f"has no `{LABEL_MANIFEST}` label, so no signature can apply to it"
            )
            raise refuse(
                "unsigned",
                f"image `{shown}` ({_short(image_id)}…) {what}; unsigned plugins are refused",
                f"{unsigned_hint} (for local development only: {local_hint})",
            )
        if image.repo_digests:
            raise refuse(
                "unsigned",
                f"image `{shown}` ({_short(image_id)}…) has no signature and came from a "
                f"registry ({image.repo_digests[0]}); `allow_unsigned_local` covers images "
                "built on this machine only",
                unsigned_hint,
            )

    manifest = None if found is None else found[1]
    if manifest is not None:
        # 7. What the manifest says must match how the job uses the image and what it runs.
        if manifest.kind != role:
            raise refuse(
                "kind",
                f"image `{shown}` is `{manifest.name}` {manifest.version}, a {manifest.kind}, "
                f"but the job uses it as the {role}",
                f"use a {role} plugin in `{grants.field_path}`",
            )
        if image_command(image) != manifest.entrypoint:
            raise refuse(
                "entrypoint",
                f"image `{shown}` runs `{list(image_command(image))}` but its manifest declares "
                f"`{list(manifest.entrypoint)}`",
                "rebuild the image so that ENTRYPOINT + CMD equal the manifest's `entrypoint`",
            )
        if expected_name is not None and manifest.name != expected_name:
            raise refuse(
                "name",
                f"image `{shown}` is the plugin `{manifest.name}`, not `{expected_name}`",
                "rebuild the built-in images with `make images`",
            )
        # 8. Rollback: never a lower version than one already run on this machine.
        if accepted is not None:
            highest = trust.seen.get(manifest.name)
            if highest is not None and manifest.semver < Version(highest):
                raise refuse(
                    "rollback",
                    f"`{manifest.name}` {manifest.version} is older than version {highest}, "
                    f"already run on this machine (`{trust.seen_path}`); a rollback is refused",
                    f"use version {highest} or later of `{manifest.name}`",
                )
    elif expected_name is not None and not local_code:
        raise refuse("name", f"image `{shown}` has no manifest; expected `{expected_name}`")

    # 9. Grants: no more network or resources than the (signed) manifest declares.
    resources = _check_grants(grants, manifest, plugin or shown, local_code=local_code)
    return VerifiedPlugin(
        image_id=image_id,
        manifest=manifest,
        key_id=None if accepted is None else accepted.key.key_id,
        publisher=None if accepted is None else accepted.publisher,
        signed=accepted is not None,
        signed_at=None if accepted is None else accepted.signed_at,
        resources=resources,
        seconds=time.perf_counter() - started,
    )


def _hint_for(check: str, trust: TrustStore, unsigned_hint: str) -> str:
    return {
        "untrusted-key": "if you trust the publisher, add its key with `dativo trust add "
        "KEY.pub.json --publisher NAME --plugins PATTERN`; otherwise do not run this image",
        "scope": f"let the publisher sign this plugin with `dativo trust add ... --plugins "
        f"NAME` (edits `{trust.policy_path}`), or use an image of a publisher it allows",
        "revoked": "ask the publisher for an image signed with a current key",
        "expired": "ask the publisher for an image signed with a current key",
        "image-mismatch": unsigned_hint,
        "manifest-mismatch": "rebuild the image from its signed source, or sign it again",
    }.get(check, "do not run this image; " + unsigned_hint)


def _check_grants(
    grants: Grants, manifest: Manifest | None, plugin: str, *, local_code: bool = False
) -> dict[str, float]:
    field_path = grants.field_path
    declared = () if manifest is None else manifest.network
    # Local code (`type: python`, only ever run under `allow_unsigned_local`) has no manifest
    # for anyone to review: the job's grant is all there is, and the supervisor says so loudly.
    extra = (
        []
        if manifest is None and local_code
        else [d for d in grants.network if not network_allows(declared, d)]
    )
    if extra:
        what = (
            f"the signed manifest of `{manifest.name}` {manifest.version}"
            if manifest is not None
            else "this unsigned plugin (it has no manifest)"
        )
        listed = ", ".join(f"`{d}`" for d in declared) or "none"
        raise ConfigError(
            f"`{field_path}.network` grants {', '.join(f'`{d}`' for d in extra)} to `{plugin}`, "
            f"which {what} does not declare (it declares: {listed}); remove the grant or use a "
            "plugin whose manifest declares it",
            field=f"{field_path}.network",
        )
    resources = dict(grants.resources)
    if manifest is None:
        return resources
    for name in RESOURCE_FIELDS:
        if name not in grants.explicit:
            resources[name] = getattr(manifest.resources.default, name)
        limit = getattr(manifest.resources.max, name)
        if name in resources and resources[name] > limit:
            raise ConfigError(
                f"`{field_path}.resources.{name}` is {_fmt(name, resources[name])}, above the "
                f"{_fmt(name, limit)} that the signed manifest of `{manifest.name}` "
                f"{manifest.version} allows; lower it to at most {_fmt(name, limit)}",
                field=f"{field_path}.resources.{name}",
            )
    return resources
