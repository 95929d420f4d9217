"""Air-gapped bundles: one file with an image, its manifest and signatures, verified on import."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dativo.config import format_size
from dativo.errors import SignatureError
from dativo.signing._keys import format_time, utc_now
from dativo.signing._manifest import (
    LABEL_MANIFEST,
    Manifest,
    ManifestError,
    canonical_json,
    loads_strict,
)
from dativo.signing._trust import TrustStore, load_trust, signatures_dir
from dativo.signing._verify import (
    ImageFacts,
    SignatureCheck,
    SignatureFile,
    check_signatures,
    image_command,
    image_manifest,
)

__all__ = ["BUNDLE_FORMAT", "ImportResult", "import_bundle", "write_bundle"]

BUNDLE_FORMAT = "dativo.bundle.v1"
INDEX = "index.json"
IMAGE = "image.tar"
_SIGNATURE_RE = re.compile(r"signatures/([0-9a-f]{16})\.sig\.json")
_MAX_INDEX = 1 << 20
_MAX_SIGNATURE = 512 * 1024
_MAX_SIGNATURES = 32
_MAX_DOCKER_META = 4 << 20
#: Largest image archive accepted in a bundle (DATIVO_BUNDLE_MAX_IMAGE overrides, in bytes).
MAX_IMAGE_BYTES = 32 << 30
_CHUNK = 1 << 20


def _bundle_error(message: str, hint: str | None = None) -> SignatureError:
    return SignatureError(
        message,
        check="bundle",
        hint=hint or "do not load this bundle; export it again from the signed image",
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, _BytesReader(data))


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._offset + size
        chunk = self._data[self._offset : end].tobytes()
        self._offset += len(chunk)
        return chunk


def write_bundle(
    out: Path,
    *,
    image_tar: Path,
    image_id: str,
    manifest: Mapping[str, Any],
    signatures: Sequence[SignatureFile],
    tags: Sequence[str] = (),
) -> None:
    """Write `out`: `index.json` (member hashes), `image.tar` and `signatures/*.sig.json`."""
    members = {IMAGE: _sha256_file(image_tar)}
    sig_members = []
    for sig in signatures:
        data = sig.to_bytes()
        name = f"signatures/{sig.key_id}.sig.json"
        members[name] = "sha256:" + hashlib.sha256(data).hexdigest()
        sig_members.append((name, data))
    index = {
        "format": BUNDLE_FORMAT,
        "image_id": image_id,
        "manifest": dict(manifest),
        "tags": list(tags),
        "created_at": format_time(utc_now()),
        "members": members,
    }
    partial = out.with_name(f".{out.name}.partial")
    try:
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, INDEX, canonical_json(index) + b"\n")
            info = tarfile.TarInfo(IMAGE)
            info.size = image_tar.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            with image_tar.open("rb") as handle:
                tar.addfile(info, handle)
            for name, data in sig_members:
                _add_bytes(tar, name, data)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class ImportResult:
    """An imported image: its verified ID and manifest, who signed it, the tags it had."""

    image_id: str
    manifest: Manifest
    publisher: str
    key_id: str
    tags: tuple[str, ...]
    signatures: tuple[SignatureCheck, ...]


def _limit(name: str) -> int:
    if name == INDEX:
        return _MAX_INDEX
    if name == IMAGE:
        return int(os.environ.get("DATIVO_BUNDLE_MAX_IMAGE") or MAX_IMAGE_BYTES)
    return _MAX_SIGNATURE


def _check_member(member: tarfile.TarInfo, seen: set[str]) -> str:
    """Refuse anything but the expected regular files, each at most its size limit."""
    name = member.name
    normal = posixpath.normpath(name)
    if name.startswith("/") or normal != name or ".." in name.split("/") or "\\" in name:
        raise _bundle_error(f"the bundle holds a member with an unsafe path `{name[:200]}`")
    if not member.isreg():
        raise _bundle_error(
            f"the bundle member `{name[:200]}` is not a regular file (links, directories and "
            "devices are refused)"
        )
    if name not in (INDEX, IMAGE) and not _SIGNATURE_RE.fullmatch(name):
        raise _bundle_error(f"the bundle holds an unexpected member `{name[:200]}`")
    if name in seen:
        raise _bundle_error(f"the bundle holds `{name}` twice")
    if member.size > _limit(name):
        raise _bundle_error(
            f"the bundle member `{name}` is {format_size(member.size)}, more than the "
            f"{format_size(_limit(name))} allowed"
        )
    seen.add(name)
    return name


def _copy(source: IO[bytes], dest: Path, limit: int) -> str:
    digest = hashlib.sha256()
    written = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > limit:
                raise _bundle_error(f"a bundle member is larger than its header says ({dest.name})")
            digest.update(chunk)
            out.write(chunk)
    return "sha256:" + digest.hexdigest()


def _unpack(path: Path, work: Path) -> tuple[dict[str, Path], dict[str, str]]:
    files: dict[str, Path] = {}
    hashes: dict[str, str] = {}
    seen: set[str] = set()
    try:
        tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by the `with` below
    except (OSError, tarfile.TarError) as exc:
        raise _bundle_error(f"`{path}` is not a bundle (not a tar archive: {exc})") from None
    with tar:
        try:
            for count, member in enumerate(tar):
                if count > _MAX_SIGNATURES + 2:
                    raise _bundle_error("the bundle holds too many members")
                name = _check_member(member, seen)
                # Our own file names, never the archive's: nothing is written outside `work`.
                local = work / f"member-{count}"
                source = tar.extractfile(member)
                if source is None:
                    raise _bundle_error(f"cannot read the bundle member `{name}`")
                with source:
                    hashes[name] = _copy(source, local, _limit(name))
                files[name] = local
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise _bundle_error(f"`{path}` is a damaged bundle: {exc}") from None
    for required in (INDEX, IMAGE):
        if required not in files:
            raise _bundle_error(f"the bundle has no `{required}`")
    return files, hashes


def _read_index(files: Mapping[str, Path], hashes: Mapping[str, str]) -> dict[str, Any]:
    try:
        index = loads_strict(files[INDEX].read_bytes())
    except ManifestError as exc:
        raise _bundle_error(f"the bundle's `{INDEX}` is malformed: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != BUNDLE_FORMAT:
        raise _bundle_error(f"the bundle's `{INDEX}` is not a `{BUNDLE_FORMAT}` index")
    members = index.get("members")
    if not isinstance(members, dict):
        raise _bundle_error(f"the bundle's `{INDEX}` lists no members")
    present = set(files) - {INDEX}
    if set(members) != present:
        missing = sorted(set(members) - present)
        extra = sorted(present - set(members))
        raise _bundle_error(
            "the bundle's members do not match its index"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; not in the index: {', '.join(extra)}" if extra else "")
        )
    for name in sorted(present):
        if members[name] != hashes[name]:
            raise _bundle_error(
                f"the bundle member `{name}` was altered: its sha256 is `{hashes[name][:19]}…` "
                f"but the index says `{str(members[name])[:19]}…`"
            )
    return index


def _image_config(image_tar: Path) -> tuple[str, dict[str, Any]]:
    """The image ID (digest of the config) and config inside a `docker save` archive.

    Layers are checked against the config's `rootfs.diff_ids` here too, so nothing but the
    signed image's own bytes is handed to the engine.
    """
    try:
        with tarfile.open(image_tar, mode="r:") as tar:
            members: dict[str, tarfile.TarInfo] = {}
            for member in tar:
                name = posixpath.normpath(member.name)
                if member.name.startswith("/") or ".." in name.split("/"):
                    raise _bundle_error(f"`{IMAGE}` holds an unsafe path `{member.name[:200]}`")
                members[name] = member

            def read(name: str, limit: int) -> bytes:
                member = members.get(posixpath.normpath(name))
                if member is not None and member.issym():
                    target = posixpath.normpath(
                        posixpath.join(posixpath.dirname(member.name), member.linkname)
                    )
                    member = members.get(target)
                if member is None or not member.isreg():
                    raise _bundle_error(f"`{IMAGE}` has no regular file `{name[:200]}`")
                if member.size > limit:
                    raise _bundle_error(f"`{IMAGE}`: `{name[:200]}` is too large")
                handle = tar.extractfile(member)
                assert handle is not None
                with handle:
                    return handle.read(limit + 1)

            def digest(name: str) -> str:
                member = members.get(posixpath.normpath(name))
                if member is not None and member.issym():
                    target = posixpath.normpath(
                        posixpath.join(posixpath.dirname(member.name), member.linkname)
                    )
                    member = members.get(target)
                if member is None or not member.isreg():
                    raise _bundle_error(f"`{IMAGE}` has no layer `{name[:200]}`")
                handle = tar.extractfile(member)
                assert handle is not None
                sha = hashlib.sha256()
                with handle:
                    while chunk := handle.read(_CHUNK):
                        sha.update(chunk)
                return "sha256:" + sha.hexdigest()

            try:
                manifest = loads_strict(read("manifest.json", _MAX_DOCKER_META))
            except ManifestError as exc:
                raise _bundle_error(f"`{IMAGE}`'s manifest.json is malformed: {exc}") from None
            if not isinstance(manifest, list) or len(manifest) != 1:
                raise _bundle_error(f"`{IMAGE}` must hold exactly one image")
            entry = manifest[0]
            config_name = entry.get("Config") if isinstance(entry, dict) else None
            layers = entry.get("Layers") if isinstance(entry, dict) else None
            if not isinstance(config_name, str) or not isinstance(layers, list):
                raise _bundle_error(f"`{IMAGE}`'s manifest.json names no config or layers")
            config_bytes = read(config_name, _MAX_DOCKER_META)
            image_id = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
            try:
                config = loads_strict(config_bytes)
            except ManifestError as exc:
                raise _bundle_error(f"`{IMAGE}`'s image config is malformed: {exc}") from None
            if not isinstance(config, dict):
                raise _bundle_error(f"`{IMAGE}`'s image config is not a JSON object")
            rootfs = config.get("rootfs") or {}
            diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
            if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
                raise _bundle_error(f"`{IMAGE}`'s layers do not match its image config")
            for position, (layer, expected) in enumerate(zip(layers, diff_ids, strict=True)):
                if not isinstance(layer, str) or digest(layer) != expected:
                    raise _bundle_error(
                        f"`{IMAGE}`: layer {position} does not match the image config's "
                        "`rootfs.diff_ids` (the image's files were altered)"
                    )
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise _bundle_error(f"`{IMAGE}` in the bundle is damaged: {exc}") from None
    return image_id, config


def import_bundle(
    path: Path,
    *,
    load: Callable[[Path], Iterable[str]],
    trust: TrustStore | None = None,
    workdir: Path | None = None,
) -> ImportResult:
    """Verify a bundle completely, then load its image with `load` and install its signatures.

    Args:
        path: the bundle file.
        load: loads a `docker save` archive into the engine, returns the loaded image IDs.
        trust: the trust store; loaded from `$DATIVO_HOME` when None.
        workdir: where to unpack (a private temporary directory by default).

    Raises:
        SignatureError: the bundle is damaged, tampered with, or not signed by a key the policy
            trusts for its plugin; nothing was loaded.
        ConfigError: the trust store or policy is malformed.
    """
    # 1. The trust store and policy, exactly as at run time.
    trust = trust or load_trust()
    work = Path(tempfile.mkdtemp(prefix="dativo-import-", dir=workdir))
    try:
        # 2. Unpack only the expected regular files, under our own names, within size limits,
        #    and check each one's sha256 against the index.
        files, hashes = _unpack(path, work)
        index = _read_index(files, hashes)
        # 3. The image ID is the digest of the image config inside the archive: computed here,
        #    never taken from the index. The layers must be the config's.
        image_id, config = _image_config(files[IMAGE])
        if index.get("image_id") != image_id:
            raise _bundle_error(
                f"the bundle's index names image `{str(index.get('image_id'))[:19]}…` but its "
                f"archive holds image `{image_id[:19]}…`"
            )
        facts = ImageFacts.from_config(image_id, config)
        # 4. The manifest is the image's own label; the index's copy must be the same.
        try:
            found = image_manifest(facts)
        except ManifestError as exc:
            raise _bundle_error(f"the image's `{LABEL_MANIFEST}` label is invalid: {exc}") from None
        if found is None:
            raise _bundle_error(f"the image has no `{LABEL_MANIFEST}` label; it cannot be signed")
        raw, manifest = found
        if canonical_json(index.get("manifest")) != canonical_json(raw):
            raise _bundle_error("the bundle's index shows a manifest other than the image's")
        if image_command(facts) != manifest.entrypoint:
            raise _bundle_error(
                f"the image runs `{list(image_command(facts))}` but its manifest declares "
                f"`{list(manifest.entrypoint)}`"
            )
        # 5. The signatures, exactly as at run time: trusted, unrevoked, unexpired key; Ed25519
        #    over the exact payload; this image ID and manifest; a publisher allowed to sign it.
        signatures: list[SignatureFile | tuple[str, str]] = []
        for name in sorted(n for n in files if _SIGNATURE_RE.fullmatch(n)):
            try:
                signatures.append(SignatureFile.parse(files[name].read_bytes(), name))
            except ManifestError as exc:
                signatures.append((name, f"unreadable signature file: {exc}"))
        if not signatures:
            raise SignatureError(
                f"the bundle holds no signature for `{manifest.name}` {manifest.version}; "
                "unsigned bundles are refused",
                check="unsigned",
                image=image_id,
                hint="sign the image (`dativo plugin sign`) before exporting it",
            )
        accepted, outcomes = check_signatures(facts, raw, manifest, signatures, trust)
        if accepted is None:
            reasons = "; ".join(f"{o.source}: {o.reason}" for o in outcomes)
            raise SignatureError(
                f"the bundle of `{manifest.name}` {manifest.version} has no valid signature: "
                f"{reasons}",
                check=outcomes[0].check if len(outcomes) == 1 else "signature",
                image=image_id,
                hint="import only bundles signed by a publisher your policy trusts for the "
                "plugin (`dativo trust list`)",
            )
        # 6. Only now does the engine see the image; what it loaded must be what was verified.
        loaded = set(load(files[IMAGE]))
        if image_id not in loaded:
            raise _bundle_error(
                f"the engine loaded {sorted(loaded) or 'nothing'} instead of the verified image "
                f"`{image_id[:19]}…`"
            )
        # 7. Install the valid signatures where the supervisor looks for them.
        target = signatures_dir(trust.home, image_id)
        target.mkdir(parents=True, exist_ok=True)
        valid = {o.source for o in outcomes if o.valid}
        for sig in signatures:
            if isinstance(sig, SignatureFile) and sig.source in valid:
                tmp = target / f".{sig.key_id}.sig.json.tmp"
                tmp.write_bytes(sig.to_bytes())
                tmp.replace(target / f"{sig.key_id}.sig.json")
        tags = tuple(t for t in index.get("tags") or () if isinstance(t, str))
        return ImportResult(
            image_id=image_id,
            manifest=manifest,
            publisher=accepted.publisher,
            key_id=accepted.key.key_id,
            tags=tags,
            signatures=tuple(outcomes),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
