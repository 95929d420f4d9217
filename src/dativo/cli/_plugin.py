"""`dativo plugin inspect|sign|export|import`: review, sign and carry plugin images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dativo.config import format_duration, format_size
from dativo.errors import ConfigError, DativoError, SignatureError


def register(commands: Any) -> None:
    parser = commands.add_parser("plugin", help="inspect, sign, export and import plugin images")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    inspect = actions.add_parser(
        "inspect",
        help="show an image's manifest, digest and signature status",
        description=(
            "Show what a reviewer needs to decide about a plugin image: its manifest (name, "
            "version, kind, entrypoint, network, resources, secrets, config schema), its image "
            "ID and whether its signatures are valid under the local trust policy."
        ),
    )
    inspect.add_argument("image", help="image reference or ID")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=_inspect)

    sign = actions.add_parser(
        "sign",
        help="sign an image's ID and manifest with a publisher key",
        description=(
            "Resolve IMAGE to its image ID, read its manifest label, and write a detached "
            "Ed25519 signature over both to $DATIVO_HOME/signatures/<image id>/<key id>.sig.json."
        ),
    )
    sign.add_argument("image", help="image reference or ID")
    sign.add_argument("--key", type=Path, required=True, metavar="NAME.key")
    sign.set_defaults(func=_sign)

    export = actions.add_parser(
        "export",
        help="write one file holding the image, its manifest and signatures",
        description="Write an air-gapped bundle of a signed image (see docs/air-gapped.md).",
    )
    export.add_argument("image", help="image reference or ID")
    export.add_argument("-o", "--output", type=Path, required=True, metavar="FILE")
    export.set_defaults(func=_export)

    imp = actions.add_parser(
        "import",
        help="verify a bundle, then load its image and install its signatures",
        description=(
            "Verify everything in the bundle (member hashes, the image ID computed from the "
            "image config, its layers, the manifest, the signatures under the local trust "
            "policy) before the engine sees the image; refuse the bundle if anything fails."
        ),
    )
    imp.add_argument("bundle", type=Path, metavar="FILE")
    imp.add_argument("--no-tag", action="store_true", help="do not re-apply the image's tags")
    imp.set_defaults(func=_import)


def _resources(limits: Any) -> str:
    return (
        f"cpus {limits.cpus:g}, memory {format_size(limits.memory)}, pids {limits.pids}, "
        f"timeout {format_duration(limits.timeout)}"
    )


def _schema_summary(schema: dict[str, Any]) -> str:
    properties = schema.get("properties")
    if not isinstance(properties, dict) or not properties:
        return "none declared" if not schema else "a schema without properties"
    required = set(schema.get("required") or ())
    keys = [f"{k}{' (required)' if k in required else ''}" for k in properties]
    return f"{len(keys)} key(s): {', '.join(keys)}"


def _inspect(args: argparse.Namespace) -> int:
    from dativo.sandbox import Engine
    from dativo.signing import (
        ManifestError,
        image_command,
        image_manifest,
        load_trust,
        read_signature_files,
        signatures_dir,
    )
    from dativo.signing._verify import check_signatures

    info = Engine().image(args.image)
    data: dict[str, Any] = {
        "image": args.image,
        "image_id": info.id,
        "tags": list(info.tags),
        "repo_digests": list(info.repo_digests),
        "entrypoint": list(image_command(info)),
        "manifest": None,
        "manifest_error": None,
        "trust_error": None,
        "status": "unsigned",
        "signatures": [],
    }
    found = None
    try:
        found = image_manifest(info)
    except ManifestError as exc:
        data["manifest_error"] = str(exc)
    if found is not None:
        data["manifest"] = found[0]
    try:
        trust = load_trust()
    except ConfigError as exc:
        trust = None
        data["trust_error"] = str(exc)
    home_sigs = None
    if trust is not None:
        home_sigs = read_signature_files(signatures_dir(trust.home, info.id))
    if home_sigs and found is not None and trust is not None:
        accepted, outcomes = check_signatures(info, found[0], found[1], home_sigs, trust)
        data["status"] = "valid" if accepted is not None else "invalid"
        data["signatures"] = [
            {
                "file": o.source,
                "valid": o.valid,
                "key_id": o.key_id,
                "publisher": o.publisher,
                "signed_at": o.signed_at,
                "check": o.check,
                "reason": o.reason,
            }
            for o in outcomes
        ]
    elif home_sigs:
        data["status"] = "invalid"
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    print(f"image:        {args.image}")
    print(f"image id:     {info.id}")
    if found is None:
        problem = data["manifest_error"] or "no `org.dativo.manifest` label"
        print(f"manifest:     NONE ({problem})")
    else:
        manifest = found[1]
        print(
            f"plugin:       {manifest.name} {manifest.version} ({manifest.kind}, protocol "
            f"{manifest.protocol})"
        )
        if manifest.description:
            print(f"description:  {manifest.description}")
        print(f"entrypoint:   {' '.join(manifest.entrypoint)}")
        print(f"network:      {', '.join(manifest.network) or 'none'}")
        print(f"resources:    default {_resources(manifest.resources.default)}")
        print(f"              max     {_resources(manifest.resources.max)}")
        print(f"secrets:      {', '.join(manifest.secrets) or 'none'}")
        print(f"config:       {_schema_summary(manifest.config_schema)}")
    if data["trust_error"]:
        print(f"signature:    UNKNOWN (the trust store is unusable: {data['trust_error']})")
    elif data["status"] == "unsigned":
        print("signature:    UNSIGNED (no signature for this image ID)")
    else:
        print(f"signature:    {data['status'].upper()}")
        for sig in data["signatures"]:
            state = "valid" if sig["valid"] else f"INVALID ({sig['reason']})"
            who = f"key {sig['key_id']}" + (f", {sig['publisher']}" if sig["publisher"] else "")
            when = f", signed {sig['signed_at']}" if sig["signed_at"] else ""
            print(f"  {Path(sig['file']).name}: {state}; {who}{when}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from dativo.sandbox import Engine
    from dativo.signing import dativo_home, load_private_key, sign_image, signatures_dir

    key = load_private_key(args.key)
    info = Engine().image(args.image)
    signature, manifest = sign_image(info, key)
    directory = signatures_dir(dativo_home(), info.id)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{key.key_id}.sig.json"
    tmp = directory / f".{key.key_id}.sig.json.tmp"
    tmp.write_bytes(signature.to_bytes())
    tmp.replace(target)
    print(
        f"signed {manifest.name} {manifest.version} ({info.id}) with key {key.key_id} "
        f"({key.public.publisher})\n  {target}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from dativo.sandbox import Engine
    from dativo.signing import (
        ManifestError,
        SignatureFile,
        dativo_home,
        image_manifest,
        read_signature_files,
        signatures_dir,
        write_bundle,
    )

    engine = Engine()
    info = engine.image(args.image)
    try:
        found = image_manifest(info)
    except ManifestError as exc:
        raise SignatureError(
            f"image `{args.image}` has an invalid manifest: {exc}", check="manifest"
        ) from None
    if found is None:
        raise SignatureError(
            f"image `{args.image}` has no manifest, so it cannot be signed or exported",
            check="manifest",
        )
    directory = signatures_dir(dativo_home(), info.id)
    signatures = [s for s in read_signature_files(directory) if isinstance(s, SignatureFile)]
    if not signatures:
        raise SignatureError(
            f"image `{args.image}` ({info.id[:19]}…) has no signature in `{directory}`; "
            "a bundle must carry one",
            check="unsigned",
            hint=f"sign it first: `dativo plugin sign {args.image} --key KEY.key`",
        )
    output: Path = args.output
    image_tar = output.with_name(f".{output.name}.image.tar")
    try:
        engine.save_image(info.id, image_tar)
        write_bundle(
            output,
            image_tar=image_tar,
            image_id=info.id,
            manifest=found[0],
            signatures=signatures,
            tags=[t for t in info.tags if t != "<none>:<none>"],
        )
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        image_tar.unlink(missing_ok=True)
    manifest = found[1]
    print(
        f"exported {manifest.name} {manifest.version} ({info.id}) with {len(signatures)} "
        f"signature(s) to {output} ({format_size(output.stat().st_size)})"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from dativo.sandbox import Engine
    from dativo.signing import dativo_home, import_bundle

    engine = Engine()
    work = dativo_home() / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = import_bundle(args.bundle, load=engine.load_image, workdir=work)
    except SignatureError as exc:
        print(f"refused {args.bundle}: nothing was loaded", file=sys.stderr)
        raise exc from None
    tagged = []
    if not args.no_tag:
        for tag in result.tags:
            try:
                engine.tag_image(result.image_id, tag)
                tagged.append(tag)
            except DativoError as exc:
                print(f"warning: {exc}", file=sys.stderr)
    manifest = result.manifest
    print(
        f"imported {manifest.name} {manifest.version} ({manifest.kind}), image {result.image_id}, "
        f"signed by {result.publisher} (key {result.key_id})"
        + (f"; tagged {', '.join(tagged)}" if tagged else "")
    )
    return 0
