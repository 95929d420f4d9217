"""`dativo keys generate`: a new Ed25519 publisher key pair."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from dativo.config import parse_duration
from dativo.errors import ConfigError


def register(commands: Any) -> None:
    parser = commands.add_parser("keys", help="generate publisher signing keys")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    generate = actions.add_parser(
        "generate",
        help="write NAME.key (private, mode 0600) and NAME.pub.json",
        description=(
            "Generate an Ed25519 key pair for signing plugin images. The private key never "
            "leaves the machine it was made on; give NAME.pub.json to whoever runs your "
            "plugins (`dativo trust add`). Existing files are never overwritten."
        ),
    )
    generate.add_argument("name", help="file name of the pair, such as `acme-release`")
    generate.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="directory to write into (default: $DATIVO_HOME/keys, outside any checkout)",
    )
    generate.add_argument("--publisher", help="the publisher's name (default: NAME, lowercased)")
    generate.add_argument(
        "--expires", metavar="DURATION", help="expire the key after DURATION, such as `365d`"
    )
    generate.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from dativo.signing import dativo_home, generate_key

    expires = None
    if args.expires:
        try:
            seconds = parse_duration(args.expires)
        except ValueError as exc:
            raise ConfigError(f"--expires: {exc}") from None
        if seconds <= 0:
            raise ConfigError("--expires: expected a positive duration such as `365d`")
        expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=seconds)
    out = args.out if args.out is not None else dativo_home() / "keys"
    key_path, pub_path, public = generate_key(
        args.name, out, publisher=args.publisher, expires_at=expires
    )
    print(f"private key: {key_path} (keep it secret; never commit it)")
    print(f"public key:  {pub_path}")
    print(f"key id:      {public.key_id}  publisher: {public.publisher}")
    if public.expires_at is not None:
        print(f"expires:     {public.to_json()['expires_at']}")
    return 0
