"""Regenerate docs/test-vectors.json, the byte-exact vectors of docs/protocol.md, with fedcompute's own code.

    .venv/bin/python scripts/make_test_vectors.py             # write docs/test-vectors.json
    .venv/bin/python scripts/make_test_vectors.py --check     # exit 1 if the file or the page's section is stale
    .venv/bin/python scripts/make_test_vectors.py --markdown  # print the "Test vectors" section of protocol.md
    .venv/bin/python scripts/make_test_vectors.py --update-doc  # also replace that section (to the page's end)

Every input is fixed, so the output is the same on every run. Two things fedcompute does with fresh randomness
are made deterministic here, without changing what a receiver checks:
- ECDSA signatures use RFC 6979 nonces (fedcompute signs with random nonces; both verify the same way);
- the HPKE seal uses a fixed ephemeral key, computed step by step after RFC 9180 (fedcompute's ``hpke.seal``
  draws a fresh one). tests/unit/test_protocol_vectors.py opens the result with ``fedcompute.keys.hpke``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import struct
import sys
import textwrap
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedcompute.attestation.results import ReleaseBinding, b64url
from fedcompute.core.context import ContributionContext, input_set_digest
from fedcompute.core.policy import AccessPolicy, PolicyDp
from fedcompute.core.tasks import TaskSpec
from fedcompute.keys import hpke, statement
from fedcompute.keys import policy as access_policy
from fedcompute.keys.envelope import parse_envelope
from fedcompute.keys.release_log import GENESIS, canonical
from fedcompute.keys.service import import_context, release_context
from fedcompute.v1 import common_pb2, upload_pb2

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "test-vectors.json"
PROTOCOL = ROOT / "docs" / "protocol.md"
SECTION = "## Test vectors\n"
FORMAT = "fedcompute-protocol-test-vectors/v1"
ARCHITECTURE = "digits-linear-v1"


def fixed_secret(label: str) -> bytes:
    """32 bytes every implementation can recompute: sha256 of an ASCII label (only a way to pick test keys)."""
    return hashlib.sha256(f"fedcompute test vector: {label}".encode()).digest()


# ---------------------------------------------------------------------------------------------------- inputs

POPULATION = "digits-demo"
MEASUREMENTS = ("sha256:" + "0123456789abcdef" * 4, "sha256:" + "fedcba9876543210" * 4)
PROVIDERS = ("kp-1", "kp-2", "kp-3")
SIGNERS = ("kp-1", "kp-2")  # t = 2 of the 3 providers sign every statement in these vectors
ACTIVATION = 1767225600  # 2026-01-01T00:00:00Z
EXPIRATION = ACTIVATION + 30 * 86400
DESTRUCTION = EXPIRATION + 7 * 86400
TASK_ID = "task_Vq3xN0bY7cR2mK8sT1wZ4A"
ROUND = 3
AGGREGATION_ID = "agg_Hx2Lp9QeT4uW6yB1nC8dFg"
ASSIGNMENT_ID = "asg_Mz5Rk1VbN7cX3wQ9tY2hJe"
MODEL_VERSION = 3
JOB_ID = "job_Qp4Wn8Ls2Dv6Bx0Zt3Kc7A"
RESULT_ID = "ar_Gt7Yh2Mk9Pw4Rz1Xc6Vb3N"
PLAINTEXT = b"fedcompute test vector plaintext"
NUM_EXAMPLES = 100
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def dp_policy() -> AccessPolicy:
    return AccessPolicy(
        policy_id="3f2a9c1e7b6d4e58a0c1d2e3f4a5b6c7",
        population_name=POPULATION,
        allowed_measurements=MEASUREMENTS,
        min_clients=16,
        dp=PolicyDp(
            clip_norm=1.0,
            noise_multiplier=1.1,
            expected_clients=16,
            epsilon=8.0,
            delta=1e-05,
            accountant="rdp",
            assumed_population_size=1000,
            adaptive_clip=True,
            target_unclipped_quantile=0.5,
            clip_learning_rate=0.2,
            clipped_count_stddev=0.8,
            metric_bounds=(("accuracy", 1.0), ("loss", 5.0)),
        ),
        plan_sha256_hex=hashlib.sha256(plan_bytes()).hexdigest(),
    )


def plain_policy() -> AccessPolicy:
    return AccessPolicy(
        policy_id="00112233445566778899aabbccddeeff",
        population_name=POPULATION,
        allowed_measurements=MEASUREMENTS[:1],
        min_clients=3,
        dp=None,
        plan_sha256_hex=hashlib.sha256(plan_bytes()).hexdigest(),
    )


def provider_key(provider_id: str) -> ec.EllipticCurvePrivateKey:
    scalar = int.from_bytes(fixed_secret(f"provider {provider_id}"), "big") % P256_ORDER
    return ec.derive_private_key(scalar, ec.SECP256R1())


def sign(data: bytes, provider_id: str) -> bytes:
    """ES256 (DER), RFC 6979 nonce so the file is reproducible; verifies exactly like fedcompute's signatures."""
    return provider_key(provider_id).sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def x25519(label: str) -> X25519PrivateKey:
    return hpke.load_private(fixed_secret(label))


def spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return statement.public_der(key.public_key())


def scalar_hex(key: ec.EllipticCurvePrivateKey) -> str:
    return f"{key.private_numbers().private_value:064x}"


def population_key() -> common_pb2.PublicKey:
    public = hpke.public_bytes(x25519("population key").public_key())
    key = common_pb2.PublicKey(
        key_id=hpke.key_id_for(public),
        public_key=public,
        kem_id=hpke.KEM_ID,
        kdf_id=hpke.KDF_ID,
        aead_id=hpke.AEAD_ID,
        activation_time_unix=ACTIVATION,
        expiration_time_unix=EXPIRATION,
        population_name=POPULATION,
        destruction_time_unix=DESTRUCTION,
        threshold=2,
        provider_ids=list(PROVIDERS),
    )
    data = statement.statement_bytes(key)
    key.signatures.extend(common_pb2.KeySignature(provider_id=p, signature=sign(data, p)) for p in SIGNERS)
    return key


PAYLOAD_METADATA = {"metrics": {"accuracy": 0.75, "loss": 0.5}, "num_examples": NUM_EXAMPLES}


def plan_bytes() -> bytes:
    spec = TaskSpec(
        population_name=POPULATION, model_architecture=ARCHITECTURE, rounds=5, report_goal=16, max_cohort=20
    )
    return spec.plan_bytes()


def context() -> ContributionContext:
    return ContributionContext(
        population_name=POPULATION,
        task_id=TASK_ID,
        round=ROUND,
        aggregation_id=AGGREGATION_ID,
        assignment_id=ASSIGNMENT_ID,
        key_id=population_key().key_id,
        model_version=MODEL_VERSION,
        plan_sha256_hex=hashlib.sha256(plan_bytes()).hexdigest(),
        policy_sha256_hex=dp_policy().sha256_hex(),
    )


# ------------------------------------------------------------------------------- RFC 9180 with a fixed ephemeral


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(32), b"HPKE-v1" + suite_id + label + ikm, hashlib.sha256).digest()


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled_info = struct.pack(">H", length) + b"HPKE-v1" + suite_id + label + info
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + labeled_info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def hpke_seal_deterministic(
    recipient: X25519PublicKey, ephemeral: X25519PrivateKey, info: bytes, aad: bytes, plaintext: bytes
) -> dict[str, bytes]:
    """RFC 9180 SealBase (mode 0x00), DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305, seq 0."""
    kem_suite = b"KEM" + struct.pack(">H", hpke.KEM_ID)
    enc = hpke.public_bytes(ephemeral.public_key())
    pk_r = hpke.public_bytes(recipient)
    dh = ephemeral.exchange(recipient)
    eae_prk = _labeled_extract(kem_suite, b"", b"eae_prk", dh)
    shared_secret = _labeled_expand(kem_suite, eae_prk, b"shared_secret", enc + pk_r, 32)
    suite = b"HPKE" + struct.pack(">HHH", hpke.KEM_ID, hpke.KDF_ID, hpke.AEAD_ID)
    psk_id_hash = _labeled_extract(suite, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(suite, b"", b"info_hash", info)
    key_schedule_context = b"\x00" + psk_id_hash + info_hash
    secret = _labeled_extract(suite, shared_secret, b"secret", b"")
    key = _labeled_expand(suite, secret, b"key", key_schedule_context, 32)
    base_nonce = _labeled_expand(suite, secret, b"base_nonce", key_schedule_context, 12)
    sealed = ChaCha20Poly1305(key).encrypt(base_nonce, plaintext, aad)  # sequence number 0: nonce = base_nonce
    return {
        "enc": enc,
        "shared_secret": shared_secret,
        "key_schedule_context": key_schedule_context,
        "key": key,
        "base_nonce": base_nonce,
        "ciphertext": enc + sealed,
    }


# ------------------------------------------------------------------------------------------------------ layouts
# The byte layouts of docs/protocol.md, written out field by field from the page (not from fedcompute's encoders),
# so that every vector also checks the page's tables: each joined layout must equal fedcompute's bytes.

Fields = list[tuple[str, bytes]]


def _u8(n: int) -> bytes:
    return struct.pack(">B", n)


def _u16(n: int) -> bytes:
    return struct.pack(">H", n)


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def _u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def _i64(n: int) -> bytes:
    return struct.pack(">q", n)


def _f64(x: float) -> bytes:
    return struct.pack(">d", x)


def _lp(name: str, raw: bytes) -> Fields:
    return [(f"len({name}) u16", _u16(len(raw))), (name, raw)]


def policy_layout(p: dict[str, Any]) -> Fields:
    out: Fields = [("magic", b"fedcompute/access-policy/v1\x00"), ("version u32", _u32(p["version"]))]
    out += _lp("policy_id", p["policy_id"].encode())
    out += _lp("population_name", p["population_name"].encode())
    out += _lp("plan_sha256_hex", p["plan_sha256_hex"].encode())
    out.append(("count(allowed_measurements) u16", _u16(len(p["allowed_measurements"]))))
    for i, m in enumerate(p["allowed_measurements"]):
        out += _lp(f"allowed_measurements[{i}]", m.encode())
    out += _lp("aggregation", p["aggregation"].encode())
    out += [("min_clients u32", _u32(p["min_clients"])), ("dp.enabled u8", _u8(p["dp"]["enabled"]))]
    d = p["dp"]
    if d["enabled"]:
        out += [
            ("dp.clip_norm f64", _f64(d["clip_norm"])),
            ("dp.noise_multiplier f64", _f64(d["noise_multiplier"])),
            ("dp.expected_clients u32", _u32(d["expected_clients"])),
            ("dp.adaptive_clip u8", _u8(d["adaptive_clip"])),
            ("dp.target_unclipped_quantile f64", _f64(d["target_unclipped_quantile"])),
            ("dp.clip_learning_rate f64", _f64(d["clip_learning_rate"])),
            ("dp.clipped_count_stddev f64", _f64(d["clipped_count_stddev"])),
            ("dp.epsilon f64", _f64(d["epsilon"])),
            ("dp.delta f64", _f64(d["delta"])),
            *_lp("dp.accountant", d["accountant"].encode()),
            ("dp.assumed_population_size u64", _u64(d["assumed_population_size"])),
            ("count(dp.metric_bounds) u16", _u16(len(d["metric_bounds"]))),
        ]
        for i, bound in enumerate(d["metric_bounds"]):
            out += _lp(f"dp.metric_bounds[{i}].name", bound["name"].encode())
            out.append((f"dp.metric_bounds[{i}].bound f64", _f64(bound["bound"])))
    return out


def key_id_layout(public_key: bytes) -> Fields:
    return [
        ("label", b"fedcompute/kid/v1\x00"),
        ("kem_id u16", _u16(0x0020)),
        ("kdf_id u16", _u16(0x0001)),
        ("aead_id u16", _u16(0x0003)),
        ("public_key (32 bytes)", public_key),
    ]


def statement_layout(k: dict[str, Any]) -> Fields:
    out: Fields = [("magic", b"fedcompute/public-key/v1\x00")]
    out += _lp("key_id", k["key_id"].encode())
    out += _lp("public_key", bytes.fromhex(k["public_key_hex"]))
    out += [
        ("kem_id u16", _u16(k["kem_id"])),
        ("kdf_id u16", _u16(k["kdf_id"])),
        ("aead_id u16", _u16(k["aead_id"])),
        ("activation_time_unix i64", _i64(k["activation_time_unix"])),
        ("expiration_time_unix i64", _i64(k["expiration_time_unix"])),
        ("destruction_time_unix i64", _i64(k["destruction_time_unix"])),
    ]
    out += _lp("population_name", k["population_name"].encode())
    out += [("threshold u8", _u8(k["threshold"])), ("count(provider_ids) u8", _u8(len(k["provider_ids"])))]
    for i, pid in enumerate(k["provider_ids"]):
        out += _lp(f"provider_ids[{i}]", pid.encode())
    return out


def context_layout(c: dict[str, Any]) -> Fields:
    out: Fields = [("magic", b"fedcompute/contribution/v2\x00")]
    out += _lp("population_name", c["population_name"].encode())
    out += _lp("task_id", c["task_id"].encode())
    out.append(("round u64", _u64(c["round"])))
    for name in ("aggregation_id", "assignment_id", "key_id"):
        out += _lp(name, c[name].encode())
    out.append(("model_version u64", _u64(c["model_version"])))
    out += _lp("plan_sha256_hex", c["plan_sha256_hex"].encode())
    out += _lp("policy_sha256_hex", c["policy_sha256_hex"].encode())
    return out


def input_set_layout(pairs: list[tuple[str, str]]) -> Fields:
    out: Fields = [("label", b"fedcompute/input-set/v1\x00")]
    for i, (a, e) in enumerate(sorted(pairs)):
        out.append((f"sorted pair {i}: assignment_id 0x00 envelope_sha256_hex 0x0a", f"{a}\x00{e}\n".encode()))
    return out


def binding_layout(b: dict[str, Any]) -> Fields:
    out: Fields = [("magic", b"fedcompute/release-binding/v3\x00")]
    out += _lp("recipient_public_key", bytes.fromhex(b["recipient_public_key_hex"]))
    out += _lp("key_id", b["key_id"].encode())
    out += _lp("task_id", b["task_id"].encode())
    out.append(("round u64", _u64(b["round"])))
    for name in ("aggregation_id", "job_id", "input_set_sha256_hex", "policy_sha256_hex"):
        out += _lp(name, b[name].encode())
    out.append(("release_number u64", _u64(b["release_number"])))
    return out


def release_context_layout(provider_id: str, share_index: int, digest: str, result_id: str) -> Fields:
    return [
        ("magic", b"fedcompute/keyshare-release/v1\x00"),
        *_lp("provider_id", provider_id.encode()),
        ("share_index u32", _u32(share_index)),
        *_lp("binding digest (base64url text)", digest.encode()),
        *_lp("result_id (jti)", result_id.encode()),
    ]


def import_context_layout(key_id: str, provider_id: str, share_index: int) -> Fields:
    return [
        ("magic", b"fedcompute/keyshare-import/v1\x00"),
        *_lp("key_id", key_id.encode()),
        *_lp("provider_id", provider_id.encode()),
        ("share_index u32", _u32(share_index)),
    ]


def fields_json(fields: Fields, expected: bytes) -> list[dict[str, str]]:
    """The layout as JSON rows, after checking that it adds up to fedcompute's own bytes."""
    joined = b"".join(raw for _, raw in fields)
    if joined != expected:
        raise AssertionError(f"the documented layout gives {joined.hex()}, fedcompute gives {expected.hex()}")
    return [{"field": name, "hex": raw.hex()} for name, raw in fields]


# ---------------------------------------------------------------------------------------------------- vectors


def _policy_input(policy: AccessPolicy) -> dict[str, Any]:
    msg = access_policy.to_message(policy)
    fields: dict[str, Any] = {
        "version": msg.version,
        "policy_id": msg.policy_id,
        "population_name": msg.population_name,
        "allowed_measurements": list(msg.allowed_measurements),
        "aggregation": msg.aggregation,
        "min_clients": msg.min_clients,
        "plan_sha256_hex": msg.plan_sha256_hex,
    }
    d = msg.dp
    fields["dp"] = {
        "enabled": d.enabled,
        "clip_norm": d.clip_norm,
        "noise_multiplier": d.noise_multiplier,
        "expected_clients": d.expected_clients,
        "adaptive_clip": d.adaptive_clip,
        "target_unclipped_quantile": d.target_unclipped_quantile,
        "clip_learning_rate": d.clip_learning_rate,
        "clipped_count_stddev": d.clipped_count_stddev,
        "epsilon": d.epsilon,
        "delta": d.delta,
        "accountant": d.accountant,
        "assumed_population_size": d.assumed_population_size,
        "metric_bounds": [{"name": b.name, "bound": b.bound} for b in d.metric_bounds],
    }
    return fields


def policy_vectors() -> list[dict[str, Any]]:
    out = []
    for name, policy in (("with_dp", dp_policy()), ("without_dp", plain_policy())):
        policy.check()
        data = policy.encode()
        fields = _policy_input(policy)
        out.append(
            {
                "name": name,
                "input": fields,
                "fields": fields_json(policy_layout(fields), data),
                "canonical_hex": data.hex(),
                "sha256_hex": policy.sha256_hex(),
                "signatures": [{"provider_id": p, "signature_der_hex": sign(data, p).hex()} for p in SIGNERS],
            }
        )
    return out


def provider_vectors() -> list[dict[str, Any]]:
    out = []
    for p in PROVIDERS:
        key = provider_key(p)
        out.append({"provider_id": p, "private_scalar_hex": scalar_hex(key), "spki_der_hex": spki(key).hex()})
    return out


def key_id_vector() -> dict[str, Any]:
    public = population_key().public_key
    preimage = b"fedcompute/kid/v1\x00" + struct.pack(">HHH", hpke.KEM_ID, hpke.KDF_ID, hpke.AEAD_ID) + public
    return {
        "public_key_hex": public.hex(),
        "fields": fields_json(key_id_layout(public), preimage),
        "preimage_hex": preimage.hex(),
        "sha256_hex": hashlib.sha256(preimage).hexdigest(),
        "key_id": hpke.key_id_for(public),
    }


def key_statement_vector() -> dict[str, Any]:
    key = population_key()
    data = statement.statement_bytes(key)
    fields = {
        "x25519_private_key_hex": hpke.private_bytes(x25519("population key")).hex(),
        "key_id": key.key_id,
        "public_key_hex": key.public_key.hex(),
        "kem_id": key.kem_id,
        "kdf_id": key.kdf_id,
        "aead_id": key.aead_id,
        "activation_time_unix": key.activation_time_unix,
        "expiration_time_unix": key.expiration_time_unix,
        "destruction_time_unix": key.destruction_time_unix,
        "population_name": key.population_name,
        "threshold": key.threshold,
        "provider_ids": list(key.provider_ids),
    }
    return {
        "input": fields,
        "fields": fields_json(statement_layout(fields), data),
        "statement_hex": data.hex(),
        "signatures": [{"provider_id": s.provider_id, "signature_der_hex": s.signature.hex()} for s in key.signatures],
    }


def plan_vector() -> dict[str, Any]:
    data = plan_bytes()
    return {"plan_json": data.decode(), "size_bytes": len(data), "sha256_hex": hashlib.sha256(data).hexdigest()}


def context_vector() -> dict[str, Any]:
    ctx = context()
    fields = {
        "population_name": ctx.population_name,
        "task_id": ctx.task_id,
        "round": ctx.round,
        "aggregation_id": ctx.aggregation_id,
        "assignment_id": ctx.assignment_id,
        "key_id": ctx.key_id,
        "model_version": ctx.model_version,
        "plan_sha256_hex": ctx.plan_sha256_hex,
        "policy_sha256_hex": ctx.policy_sha256_hex,
    }
    return {
        "input": fields,
        "fields": fields_json(context_layout(fields), ctx.encode()),
        "encoded_hex": ctx.encode().hex(),
    }


def hpke_vector() -> dict[str, Any]:
    recipient = x25519("population key")
    ephemeral = x25519("device ephemeral")
    info = context().encode()
    out = hpke_seal_deterministic(recipient.public_key(), ephemeral, info, b"", PLAINTEXT)
    assert hpke.open_sealed(out["ciphertext"], recipient, info) == PLAINTEXT
    return {
        "kem_id": hpke.KEM_ID,
        "kdf_id": hpke.KDF_ID,
        "aead_id": hpke.AEAD_ID,
        "mode": 0,
        "recipient_private_key_hex": hpke.private_bytes(recipient).hex(),
        "recipient_public_key_hex": hpke.public_bytes(recipient.public_key()).hex(),
        "ephemeral_private_key_hex": hpke.private_bytes(ephemeral).hex(),
        "info_hex": info.hex(),
        "aad_hex": "",
        "plaintext_hex": PLAINTEXT.hex(),
        "enc_hex": out["enc"].hex(),
        "shared_secret_hex": out["shared_secret"].hex(),
        "key_schedule_context_hex": out["key_schedule_context"].hex(),
        "key_hex": out["key"].hex(),
        "base_nonce_hex": out["base_nonce"].hex(),
        "ciphertext_hex": out["ciphertext"].hex(),
    }


def envelope_bytes() -> bytes:
    ctx = context()
    sealed = bytes.fromhex(hpke_vector()["ciphertext_hex"])
    envelope = upload_pb2.EncryptedContribution(
        version=1,
        key_id=ctx.key_id,
        kem_id=hpke.KEM_ID,
        kdf_id=hpke.KDF_ID,
        aead_id=hpke.AEAD_ID,
        context=ctx.encode(),
        ciphertext=sealed,
    )
    data = envelope.SerializeToString()
    parse_envelope(data)
    return data


def envelope_vector() -> dict[str, Any]:
    data = envelope_bytes()
    return {
        "serialized_hex": data.hex(),
        "upload_metadata": {"total_size_bytes": len(data), "sha256_hex": hashlib.sha256(data).hexdigest()},
        "upload_resource_name": f"uploads/{ASSIGNMENT_ID}",
    }


def payload_vector() -> dict[str, Any]:
    import torch  # heavy: only this vector needs it

    from fedcompute.core import checkpoints
    from fedcompute.core.architectures import build_model

    shapes = {k: tuple(v.shape) for k, v in build_model(ARCHITECTURE).state_dict().items()}
    weight = (torch.arange(640, dtype=torch.float32).reshape(10, 64) - 320) / 256
    bias = (torch.arange(10, dtype=torch.float32) - 5) / 8
    tensors = {"0.weight": weight, "0.bias": bias}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    from fedcompute.core import plans

    plans.check_tensors(plans.parse(plan_bytes()).schema(), tensors)
    data = checkpoints.encode(tensors, PAYLOAD_METADATA)
    header_len = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + header_len].decode()
    weight_data = data[8 + header_len + 40 :]
    return {
        "architecture": ARCHITECTURE,
        "tensors": [
            {"name": "0.bias", "dtype": "F32", "shape": [10], "values": "bias[i] = (i - 5) / 8"},
            {"name": "0.weight", "dtype": "F32", "shape": [10, 64], "values": "weight[i][j] = (64*i + j - 320) / 256"},
        ],
        "metadata": PAYLOAD_METADATA,
        "header_length": header_len,
        "header_json": header.rstrip(" "),
        "header_padding_spaces": len(header) - len(header.rstrip(" ")),
        "size_bytes": len(data),
        "bias_data_hex": data[8 + header_len : 8 + header_len + 40].hex(),
        "weight_data_sha256_hex": hashlib.sha256(weight_data).hexdigest(),
        "sha256_hex": hashlib.sha256(data).hexdigest(),
        "payload_hex": data.hex(),
    }


def input_set_vector() -> dict[str, Any]:
    pairs = [
        (ASSIGNMENT_ID, hashlib.sha256(envelope_bytes()).hexdigest()),
        ("asg_Bq8Nw3Ty6Uo1Ip4As7Df2G", hashlib.sha256(b"another envelope").hexdigest()),
        ("asg_Aa0Zz9Yy8Xx7Ww6Vv5Uu4T", hashlib.sha256(b"a third envelope").hexdigest()),
    ]
    preimage = b"fedcompute/input-set/v1\x00" + b"".join(f"{a}\x00{e}\n".encode() for a, e in sorted(pairs))
    digest = input_set_digest(pairs)
    assert digest == hashlib.sha256(preimage).hexdigest()
    return {
        "pairs": [{"assignment_id": a, "envelope_sha256_hex": e} for a, e in pairs],
        "fields": fields_json(input_set_layout(pairs), preimage),
        "preimage_hex": preimage.hex(),
        "digest_hex": digest,
    }


def binding() -> ReleaseBinding:
    return ReleaseBinding(
        recipient_public_key=hpke.public_bytes(x25519("aggregator ephemeral").public_key()),
        key_id=population_key().key_id,
        task_id=TASK_ID,
        round=ROUND,
        aggregation_id=AGGREGATION_ID,
        job_id=JOB_ID,
        input_set_sha256_hex=input_set_vector()["digest_hex"],
        policy_sha256_hex=dp_policy().sha256_hex(),
        release_number=1,  # the policy's first DP release
    )


def auditor_vectors() -> dict[str, Any]:
    b = binding()
    entry = {
        "v": 2,
        "provider_id": "kp-1",
        "time_unix": ACTIVATION + 86400,
        "policy_sha256": b.policy_sha256_hex,
        "population": POPULATION,
        "task_id": TASK_ID,
        "round": ROUND,
        "aggregation_id": AGGREGATION_ID,
        "key_id": b.key_id,
        "input_set_sha256": b.input_set_sha256_hex,
        "inputs": sorted([p["assignment_id"], p["envelope_sha256_hex"]] for p in input_set_vector()["pairs"]),
        "measurement": MEASUREMENTS[0],
        "repeat": False,
        "releases_charged": 1,
        "epsilon_after": 0.5,
        "job_id": b.job_id,
        "recipient": b.recipient_public_key.hex(),
        "release_number": b.release_number,
        "seq": 0,
        "prev": GENESIS,
    }
    body = canonical(entry)
    binding_fields = {
        "recipient_public_key_hex": b.recipient_public_key.hex(),
        "key_id": b.key_id,
        "task_id": b.task_id,
        "round": b.round,
        "aggregation_id": b.aggregation_id,
        "job_id": b.job_id,
        "input_set_sha256_hex": b.input_set_sha256_hex,
        "policy_sha256_hex": b.policy_sha256_hex,
        "release_number": b.release_number,
    }
    preimage = b"".join(raw for _, raw in binding_layout(binding_fields))
    if b64url(hashlib.sha256(preimage).digest()) != b.digest():
        raise AssertionError("the documented release-binding layout does not give fedcompute's digest")
    released = release_context(b, "kp-1", 1, RESULT_ID)
    imported = import_context(b.key_id, "kp-2", 2)
    return {
        "release_binding": {
            "input": binding_fields,
            "fields": fields_json(binding_layout(binding_fields), preimage),
            "sha256_hex": hashlib.sha256(preimage).hexdigest(),
            "digest_b64url": b.digest(),
        },
        "release_context": {
            "input": {"provider_id": "kp-1", "share_index": 1, "result_id": RESULT_ID},
            "fields": fields_json(release_context_layout("kp-1", 1, b.digest(), RESULT_ID), released),
            "encoded_hex": released.hex(),
        },
        "import_context": {
            "input": {"key_id": b.key_id, "provider_id": "kp-2", "share_index": 2},
            "fields": fields_json(import_context_layout(b.key_id, "kp-2", 2), imported),
            "encoded_hex": imported.hex(),
        },
        "release_log_entry": {
            "body_json": body.decode(),
            "body_sha256_hex": hashlib.sha256(body).hexdigest(),
            "signature_der_hex": sign(body, "kp-1").hex(),
        },
    }


def build(include_payload: bool = True) -> dict[str, Any]:
    """Every vector; without the payload, torch is never imported."""
    vectors = {
        "format": FORMAT,
        "about": "Test vectors of docs/protocol.md; regenerate with scripts/make_test_vectors.py.",
        "providers": provider_vectors(),
        "access_policies": policy_vectors(),
        "key_id": key_id_vector(),
        "key_statement": key_statement_vector(),
        "plan": plan_vector(),
        "contribution_context": context_vector(),
        "hpke": hpke_vector(),
        "envelope": envelope_vector(),
        "input_set": input_set_vector(),
        "auditor": auditor_vectors(),
    }
    if not include_payload:
        return vectors
    ordered = list(vectors.items())
    ordered.insert(list(vectors).index("input_set"), ("payload", payload_vector()))
    return dict(ordered)


def render(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, indent=2) + "\n"


# ------------------------------------------------------------------------------------------ markdown appendix


def _block(value: str, width: int = 64) -> str:
    return "```\n" + ("\n".join(textwrap.wrap(value, width)) if value else "(empty)") + "\n```\n"


def _table(rows: dict[str, Any]) -> str:
    lines = ["| field | value |", "|---|---|"]
    for name, value in rows.items():
        shown = json.dumps(value) if isinstance(value, (list, bool)) else str(value)
        lines.append(f"| `{name}` | `{shown}` |")
    return "\n".join(lines) + "\n"


def _layout(rows: list[dict[str, str]]) -> str:
    lines = ["| field | bytes (hex) |", "|---|---|"]
    lines += [f"| {row['field']} | `{row['hex']}` |" for row in rows]
    return "\n".join(lines) + "\n"


def _signatures(what: str, signatures: list[dict[str, str]]) -> list[str]:
    out = []
    for sig in signatures:
        out.append(f"Signature of `{sig['provider_id']}` over {what} (DER):\n")
        out.append(_block(sig["signature_der_hex"]))
    return out


def _inline(fields: dict[str, Any]) -> str:
    return ", ".join(f"`{k}` = `{val}`" for k, val in fields.items())


def markdown(v: dict[str, Any]) -> str:
    """The "Test vectors" section of docs/protocol.md: every value of the JSON but the whole payload's bytes."""
    out = [
        SECTION,
        "<!-- Generated by `scripts/make_test_vectors.py --update-doc`; do not edit by hand. -->\n",
        f"Every value here is also in [`test-vectors.json`](test-vectors.json) (format `{v['format']}`),\n"
        "made by `scripts/make_test_vectors.py` with fedcompute's own code and checked by\n"
        "`tests/unit/test_protocol_vectors.py`, which also checks that this section is what the script prints.\n"
        "Hex is lowercase; long values are wrapped at 32 bytes. Every layout table was written from this page,\n"
        "field by field, and must add up to fedcompute's bytes. Test keys are\n"
        '`sha256("fedcompute test vector: " || label)`: that is only how they were picked.\n',
        "Signatures are DER ECDSA P-256/SHA-256 with RFC 6979 nonces, so that the file is reproducible; key\n"
        "services use random nonces. Accept any valid signature: test that the stored ones verify, not that you\n"
        "reproduce them.\n",
        "### V1. Providers (ES256 signing keys)\n",
    ]
    for p in v["providers"]:
        out.append(f"`{p['provider_id']}`: private scalar `{p['private_scalar_hex']}`; SubjectPublicKeyInfo (DER):\n")
        out.append(_block(p["spki_der_hex"]))
    for n, pol in enumerate(v["access_policies"], start=2):
        out.append(f"### V{n}. Access policy `{pol['name']}`\n")
        fields = dict(pol["input"])
        dp = fields.pop("dp")
        out.append(_table(fields))
        out.append("`dp`:\n\n" + _table(dp))
        out.append(_layout(pol["fields"]))
        out.append("Canonical bytes:\n")
        out.append(_block(pol["canonical_hex"]))
        out.append(f"sha256 (the `policy_sha256_hex` bound into uploads): `{pol['sha256_hex']}`\n")
        out += _signatures("the canonical bytes", pol["signatures"])
    k = v["key_id"]
    out.append("### V4. Key id\n")
    out.append(_layout(k["fields"]))
    out.append(f"sha256 of the preimage `{k['preimage_hex']}`:\n`{k['sha256_hex']}`; key id `{k['key_id']}`.\n")
    ks = v["key_statement"]
    out.append("### V5. Key statement\n")
    out.append(_table(ks["input"]))
    out.append(_layout(ks["fields"]))
    out.append("Statement bytes:\n")
    out.append(_block(ks["statement_hex"]))
    out += _signatures("the statement", ks["signatures"])
    pl = v["plan"]
    out.append("### V6. Plan resource\n")
    shown = json.loads(pl["plan_json"])
    program = shown["program"]["exported_program"]
    shown["program"]["exported_program"] = f"... ({len(program)} characters of torch.export JSON; in the file)"
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(shown.items()))
    out.append(f"```\n{{\n{body}\n}}\n```\n")
    out.append("As sent, the plan is that object without whitespace (`docs/test-vectors.json` has it whole).\n")
    out.append(f"{pl['size_bytes']} bytes, sha256 `{pl['sha256_hex']}`.\n")
    c = v["contribution_context"]
    out.append("### V7. Contribution context (HPKE info)\n")
    out.append(_table(c["input"]))
    out.append(_layout(c["fields"]))
    out.append("Encoding:\n")
    out.append(_block(c["encoded_hex"]))
    h = v["hpke"]
    out.append("### V8. HPKE seal with a fixed ephemeral key\n")
    out.append(
        f"Suite KEM `{h['kem_id']:#06x}`, KDF `{h['kdf_id']:#06x}`, AEAD `{h['aead_id']:#06x}`, "
        f"mode `{h['mode']:#04x}` (base); info = V7's encoding; aad empty; one seal (sequence number 0,\n"
        "nonce = base_nonce). A device draws a fresh ephemeral key for every seal; this vector fixes it. Test\n"
        "`open` with the recipient key, and `seal` by reproducing `ciphertext` from the fixed ephemeral key (or by\n"
        "opening your own output). The recipient is V5's key (its private key is public here: a test key).\n"
    )
    for name in (
        "recipient_private_key_hex",
        "recipient_public_key_hex",
        "ephemeral_private_key_hex",
        "plaintext_hex",
        "enc_hex",
        "shared_secret_hex",
        "key_schedule_context_hex",
        "key_hex",
        "base_nonce_hex",
        "ciphertext_hex",
    ):
        out.append(f"`{name.removesuffix('_hex')}`:\n")
        out.append(_block(h[name]))
    e = v["envelope"]
    m = e["upload_metadata"]
    out.append("### V9. EncryptedContribution and upload metadata\n")
    out.append("The envelope of V8's ciphertext, serialized (protobuf, fields in number order):\n")
    out.append(_block(e["serialized_hex"]))
    out.append(
        f"Upload to `{e['upload_resource_name']}`, first `WriteRequest.metadata` = `total_size_bytes: "
        f'{m["total_size_bytes"]}`, `sha256_hex: "{m["sha256_hex"]}"`.\n'
    )
    p = v["payload"]
    out.append("### V10. Update payload (safetensors)\n")
    out.append(f"Architecture `{p['architecture']}`; metadata `{json.dumps(p['metadata'])}`; tensors:\n")
    for t in p["tensors"]:
        out.append(f"- `{t['name']}`: {t['dtype']}, shape {t['shape']}, `{t['values']}`")
    out.append(
        f"\nHeader ({p['header_length']} bytes: this JSON, then {p['header_padding_spaces']} space(s) to a multiple "
        "of 8):\n"
    )
    out.append(f"```\n{p['header_json']}\n```\n")
    out.append(
        f"Whole payload: {p['size_bytes']} bytes, sha256 `{p['sha256_hex']}` (the bytes are `payload_hex` in\n"
        f"test-vectors.json). The 40 data bytes of `0.bias`: `{p['bias_data_hex']}`; sha256 of the 2560 data bytes\n"
        f"of `0.weight`: `{p['weight_data_sha256_hex']}`.\n"
    )
    s = v["input_set"]
    out.append("### V11. Input-set digest\n")
    out.append("Pairs (assignment id, envelope sha256), in the order given:\n")
    out += [f"- `{pair['assignment_id']}`, `{pair['envelope_sha256_hex']}`" for pair in s["pairs"]]
    out.append("")
    out.append(_layout(s["fields"]))
    out.append("Preimage:\n")
    out.append(_block(s["preimage_hex"]))
    out.append(f"Digest: `{s['digest_hex']}`.\n")
    a = v["auditor"]
    rb = a["release_binding"]
    out.append("### V12. Release binding, release and import contexts, release log entry\n")
    out.append(_table(rb["input"]))
    out.append(_layout(rb["fields"]))
    out.append(f"sha256 `{rb['sha256_hex']}`; binding (base64url, no padding): `{rb['digest_b64url']}`.\n")
    rc = a["release_context"]
    out.append(f"Release context for {_inline(rc['input'])} and the binding above:\n")
    out.append(_layout(rc["fields"]))
    out.append(_block(rc["encoded_hex"]))
    ic = a["import_context"]
    out.append(f"Import context for {_inline(ic['input'])}:\n")
    out.append(_layout(ic["fields"]))
    out.append(_block(ic["encoded_hex"]))
    le = a["release_log_entry"]
    out.append("The first entry of a release log (canonical JSON body):\n")
    out.append(f"```\n{le['body_json']}\n```\n")
    out.append(f"Its sha256 (the next entry's `prev`): `{le['body_sha256_hex']}`. Signature of `kp-1` (DER):\n")
    out.append(_block(le["signature_der_hex"]))
    return "\n".join(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if docs/test-vectors.json is out of date")
    parser.add_argument("--markdown", action="store_true", help="print the Test vectors section of protocol.md")
    parser.add_argument("--update-doc", action="store_true", help="write the JSON and that section of protocol.md")
    args = parser.parse_args(argv)
    vectors = build()
    if args.markdown:
        sys.stdout.write(markdown(vectors))
        return 0
    if args.update_doc:
        page = PROTOCOL.read_text()
        if SECTION not in page:
            print(f"{PROTOCOL.relative_to(ROOT)} has no {SECTION.strip()!r} section", file=sys.stderr)
            return 1
        PROTOCOL.write_text(page[: page.index(SECTION)] + markdown(vectors))
        print(f"updated the test vectors of {PROTOCOL.relative_to(ROOT)}")
    text = render(vectors)
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        page = PROTOCOL.read_text() if PROTOCOL.exists() else ""
        if current != text or not page.endswith(markdown(vectors)):
            print(
                "docs/test-vectors.json or docs/protocol.md is out of date; run this with --update-doc", file=sys.stderr
            )
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
