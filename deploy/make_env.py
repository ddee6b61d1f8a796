"""Print a .env for deploy/compose.yaml with every secret freshly generated: ``python3 make_env.py > .env``.

Run it once: a second run makes new secrets, which the existing volumes (database password, MinIO users, key
services' sealed shares under their KEKs) no longer match. The two operator tokens stay empty until the server
has made them (`fedcompute token create`, docs/operations.md).
"""

from __future__ import annotations

import secrets

GENERATED = (
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_PASSWORD",
    "S3_SECRET_ACCESS_KEY",
    "INTERNAL_TOKEN",
    "TOKEN_SECRET",
    "KEY_ADMIN_TOKEN",
    "KEK_KP_0",
    "KEK_KP_1",
    "KEK_KP_2",
    "GRAFANA_ADMIN_PASSWORD",
)
FILLED_LATER = ("DEALER_OPERATOR_TOKEN", "ADMIN_OPERATOR_TOKEN")


def lines() -> list[str]:
    out = [f"MINIO_ROOT_USER=root-{secrets.token_hex(4)}", f"S3_ACCESS_KEY_ID=fedcompute-{secrets.token_hex(4)}"]
    out += [f"{name}={secrets.token_hex(32)}" for name in GENERATED]  # 32 bytes; hex is safe in URLs
    out += [f"{name}=" for name in FILLED_LATER]
    return out


if __name__ == "__main__":
    print("\n".join(lines()))
