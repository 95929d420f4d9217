"""`dativo trust add|list|revoke|allow-unsigned-local`: the trust store and policy."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_UNSIGNED_BANNER = (
    "!! allow_unsigned_local is ON: images built on this machine without a valid signature,\n"
    "!! and `type: python` plugins, may now run. Every such run is labelled UNSIGNED.\n"
    "!! Use it for plugin development only; `dativo trust allow-unsigned-local off` undoes it."
)


def register(commands: Any) -> None:
    parser = commands.add_parser("trust", help="manage trusted publisher keys and the policy")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add",
        help="trust a publisher key for some plugins",
        description=(
            "Copy KEY.pub.json into $DATIVO_HOME/trust/keys and let its publisher sign the "
            "plugins matching PATTERN (glob patterns of manifest names). Idempotent."
        ),
    )
    add.add_argument("key", type=Path, metavar="KEY.pub.json")
    add.add_argument("--publisher", help="publisher name (default: the one in the key file)")
    add.add_argument(
        "--plugins",
        nargs="+",
        required=True,
        metavar="PATTERN",
        help="plugin names it may sign, such as 'acme/*' (quote the glob)",
    )
    add.set_defaults(func=_add)

    listing = actions.add_parser("list", help="show trusted keys, publishers and the policy")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=_list)

    revoke = actions.add_parser(
        "revoke", help="revoke a key: its signatures are refused from now on"
    )
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(func=_revoke)

    unsigned = actions.add_parser(
        "allow-unsigned-local",
        help="DANGER: let unsigned local images and `type: python` plugins run (or stop it)",
    )
    unsigned.add_argument("state", choices=["on", "off"])
    unsigned.set_defaults(func=_unsigned)


def _add(args: argparse.Namespace) -> int:
    from dativo.signing import add_trusted_key, load_public_key

    public = load_public_key(args.key)
    changes = add_trusted_key(public, publisher=args.publisher, plugins=list(args.plugins))
    for change in changes:
        print(change)
    if not changes:
        print(f"unchanged: key `{public.key_id}` is already trusted for {', '.join(args.plugins)}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from dativo.signing import load_trust

    trust = load_trust()
    policy = trust.policy
    data: dict[str, Any] = {
        "home": str(trust.home),
        "policy": str(trust.policy_path),
        "allow_unsigned_local": policy.allow_unsigned_local,
        "publishers": [p.model_dump() for p in policy.publishers],
        "keys": [
            {
                **key.to_json(),
                "revoked": key.key_id in policy.revoked_keys,
                "expired": key.expired(),
                "trusted_as": (p.name if (p := policy.publisher_of(key.key_id)) else None),
            }
            for key in trust.keys.values()
        ],
        "revoked_keys": policy.revoked_keys,
        "seen": trust.seen,
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"trust policy: {data['policy']}")
    if policy.allow_unsigned_local:
        print("allow_unsigned_local: ON (unsigned local images and python plugins may run)")
    else:
        print("allow_unsigned_local: off")
    for publisher in policy.publishers:
        print(f"publisher {publisher.name}: may sign {', '.join(publisher.plugins)}")
        for key_id in publisher.keys:
            key = trust.keys[key_id]
            state = (
                "REVOKED"
                if key_id in policy.revoked_keys
                else "EXPIRED"
                if key.expired()
                else "valid"
            )
            expiry = key.to_json().get("expires_at", "never")
            print(
                f"  key {key_id}  {state}  created {key.to_json()['created_at']}  expires {expiry}"
            )
    for key_id in policy.revoked_keys:
        if policy.publisher_of(key_id) is None:
            print(f"revoked key {key_id}")
    for name, version in sorted(trust.seen.items()):
        print(f"seen {name} {version} (older versions are refused)")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from dativo.signing import revoke_key

    changed = revoke_key(args.key_id)
    print(f"{'revoked' if changed else 'already revoked:'} key {args.key_id}")
    return 0


def _unsigned(args: argparse.Namespace) -> int:
    from dativo.signing import dativo_home, policy_path, set_allow_unsigned_local

    set_allow_unsigned_local(args.state == "on")
    if args.state == "on":
        print(_UNSIGNED_BANNER, file=sys.stderr)
    print(f"allow_unsigned_local: {args.state} in {policy_path(dativo_home())}")
    return 0
