"""docs/test-vectors.json against fedcompute's own code, and docs/protocol.md against the JSON.

Every deterministic vector is recomputed from its stored inputs with the project's functions; stored signatures
must verify under the stored provider keys; the stored HPKE ciphertext must open with ``fedcompute.keys.hpke``.
Every layout table must add up to the bytes. Every value of the JSON (except the whole payload, which the page
names by its sha256) must appear in the page, whose "Test vectors" section must be what the script prints.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedcompute.attestation.results import ReleaseBinding, b64url
from fedcompute.clients.device import Trust
from fedcompute.core.context import ContributionContext, input_set_digest
from fedcompute.core.policy import DeviceFloor
from fedcompute.keys import hpke, statement
from fedcompute.keys.envelope import check_envelope, parse_envelope
from fedcompute.keys.policy import UntrustedPolicy, check_signed
from fedcompute.keys.policy import from_message as policy_from_message
from fedcompute.keys.release_log import GENESIS, SignedEntry, canonical, verify_entries
from fedcompute.keys.service import import_context, release_context
from fedcompute.v1 import common_pb2, task_assignment_pb2

ROOT = Path(__file__).resolve().parents[2]
VECTORS_PATH = ROOT / "docs" / "test-vectors.json"
PROTOCOL_PATH = ROOT / "docs" / "protocol.md"
JSON_ONLY = {
    ("payload", "payload_hex"),
    ("plan", "plan_json"),
}  # too long for the page, which gives its sha256 and points to the JSON


@cache
def vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS_PATH.read_text())
    return data


@cache
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_test_vectors", ROOT / "scripts" / "make_test_vectors.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trusted() -> dict[str, ec.EllipticCurvePublicKey]:
    return {
        p["provider_id"]: statement.load_signing_public(bytes.fromhex(p["spki_der_hex"]))
        for p in vectors()["providers"]
    }


def policy_message(fields: dict[str, Any]) -> common_pb2.AccessPolicy:
    plain = {k: v for k, v in fields.items() if k != "dp"}
    return common_pb2.AccessPolicy(**plain, dp=common_pb2.PolicyDp(**fields["dp"]))


def key_message() -> common_pb2.PublicKey:
    v = vectors()["key_statement"]
    i = v["input"]
    key = common_pb2.PublicKey(
        key_id=i["key_id"],
        public_key=bytes.fromhex(i["public_key_hex"]),
        kem_id=i["kem_id"],
        kdf_id=i["kdf_id"],
        aead_id=i["aead_id"],
        activation_time_unix=i["activation_time_unix"],
        expiration_time_unix=i["expiration_time_unix"],
        population_name=i["population_name"],
        destruction_time_unix=i["destruction_time_unix"],
        threshold=i["threshold"],
        provider_ids=i["provider_ids"],
    )
    for s in v["signatures"]:
        key.signatures.append(
            common_pb2.KeySignature(provider_id=s["provider_id"], signature=bytes.fromhex(s["signature_der_hex"]))
        )
    return key


def signed_policy(name: str) -> common_pb2.SignedAccessPolicy:
    (pol,) = [p for p in vectors()["access_policies"] if p["name"] == name]
    return common_pb2.SignedAccessPolicy(
        policy=policy_message(pol["input"]),
        signatures=[
            common_pb2.KeySignature(provider_id=s["provider_id"], signature=bytes.fromhex(s["signature_der_hex"]))
            for s in pol["signatures"]
        ],
    )


def joined(rows: list[dict[str, str]]) -> str:
    """A layout table's bytes, in order (the tables of protocol.md, as stored in the JSON)."""
    return "".join(row["hex"] for row in rows)


def compact(text: str) -> str:
    return re.sub(r"\s+", "", text)


def context() -> ContributionContext:
    return ContributionContext(**vectors()["contribution_context"]["input"])


def test_the_file_is_what_the_script_makes() -> None:
    """The script regenerates the file (the payload, which needs torch, is compared in its own test)."""
    assert script().build(include_payload=False) == {k: v for k, v in vectors().items() if k != "payload"}
    assert list(vectors()) == [*list(script().build(include_payload=False))[:-2], "payload", "input_set", "auditor"]


def test_provider_keys() -> None:
    for p in vectors()["providers"]:
        key = ec.derive_private_key(int(p["private_scalar_hex"], 16), ec.SECP256R1())
        assert statement.public_der(key.public_key()).hex() == p["spki_der_hex"]


@pytest.mark.parametrize("name", ["with_dp", "without_dp"])
def test_access_policy_bytes_hash_and_signatures(name: str) -> None:
    (pol,) = [p for p in vectors()["access_policies"] if p["name"] == name]
    policy = policy_from_message(policy_message(pol["input"]))
    policy.check()
    assert (policy.dp is not None) == pol["input"]["dp"]["enabled"]
    assert policy.encode().hex() == pol["canonical_hex"] == joined(pol["fields"])
    assert policy.sha256_hex() == pol["sha256_hex"] == hashlib.sha256(policy.encode()).hexdigest()
    for s in pol["signatures"]:
        assert statement.verify_signature(
            policy.encode(), bytes.fromhex(s["signature_der_hex"]), trusted()[s["provider_id"]]
        )
    assert check_signed(signed_policy(name), trusted(), 2) == policy
    with pytest.raises(UntrustedPolicy, match="2 valid signature"):
        check_signed(signed_policy(name), trusted(), 3)


def test_dp_fields_do_not_count_when_dp_is_off() -> None:
    """protocol.md 4.4: with ``dp.enabled`` false the other PolicyDp fields are not encoded."""
    (pol,) = [p for p in vectors()["access_policies"] if p["name"] == "without_dp"]
    msg = policy_message(pol["input"])
    msg.dp.clip_norm, msg.dp.epsilon, msg.dp.accountant = 3.0, 1.0, "rdp"
    assert policy_from_message(msg).encode().hex() == pol["canonical_hex"]


def test_key_id_and_statement() -> None:
    k = vectors()["key_id"]
    ks = vectors()["key_statement"]
    private = hpke.load_private(bytes.fromhex(ks["input"]["x25519_private_key_hex"]))
    public = hpke.public_bytes(private.public_key())
    assert public.hex() == k["public_key_hex"] == ks["input"]["public_key_hex"]
    assert hashlib.sha256(bytes.fromhex(k["preimage_hex"])).hexdigest() == k["sha256_hex"]
    assert joined(k["fields"]) == k["preimage_hex"]
    assert bytes.fromhex(k["preimage_hex"]).endswith(public)
    assert hpke.key_id_for(public) == k["key_id"] == ks["input"]["key_id"]
    assert (ks["input"]["kem_id"], ks["input"]["kdf_id"], ks["input"]["aead_id"]) == (0x0020, 0x0001, 0x0003)
    assert (hpke.KEM_ID, hpke.KDF_ID, hpke.AEAD_ID) == (0x0020, 0x0001, 0x0003)
    key = key_message()
    data = statement.statement_bytes(key)
    assert data.hex() == ks["statement_hex"] == joined(ks["fields"])
    for s in key.signatures:
        assert statement.verify_signature(data, s.signature, trusted()[s.provider_id])
    statement.check_trusted(key, trusted(), 2)
    with pytest.raises(statement.UntrustedKey):
        statement.check_trusted(key, trusted(), 3)
    key.expiration_time_unix += 1
    with pytest.raises(statement.UntrustedKey):
        statement.check_trusted(key, trusted(), 1)


def test_signatures_are_domain_separated() -> None:
    key_sig = vectors()["key_statement"]["signatures"][0]
    policy_bytes = bytes.fromhex(vectors()["access_policies"][0]["canonical_hex"])
    assert not statement.verify_signature(
        policy_bytes, bytes.fromhex(key_sig["signature_der_hex"]), trusted()[key_sig["provider_id"]]
    )


def vector_assignment() -> tuple[task_assignment_pb2.TaskAssignment, Trust]:
    """The assignment the vectors describe (their key, the DP policy, the plan) and a device's trust in their
    providers (2 of them)."""
    plan = vectors()["plan"]
    ctx = vectors()["contribution_context"]["input"]
    assignment = task_assignment_pb2.TaskAssignment(
        population_name=ctx["population_name"],
        task_id=ctx["task_id"],
        round=ctx["round"],
        aggregation_id=ctx["aggregation_id"],
        assignment_id=ctx["assignment_id"],
        plan=common_pb2.Resource(resource_name=f"plans/{ctx['task_id']}", sha256_hex=plan["sha256_hex"]),
        model_version=ctx["model_version"],
        encryption_key=key_message(),
        access_policy=signed_policy("with_dp"),
    )
    return assignment, Trust(trusted(), 2)


def test_device_accepts_the_assignment_and_derives_the_context() -> None:
    """What ``clients/device.py`` does with a relayed assignment: the checks of ``Trust.check`` (but the key's
    times: the vectors' key is past its destruction), then ``context_of``."""
    plan = vectors()["plan"]
    assignment, _ = vector_assignment()
    key = assignment.encryption_key
    statement.check_trusted(key, trusted(), 2)
    policy = check_signed(assignment.access_policy, trusted(), 2)
    assert policy.population_name == assignment.population_name == key.population_name
    lifetime = key.expiration_time_unix - key.activation_time_unix
    assert (
        DeviceFloor(require_dp=True, min_clients=16, min_threshold=2).violations(policy, key.threshold, lifetime) == []
    )
    assert DeviceFloor(min_clients=17).violations(policy, key.threshold, lifetime)
    derived = ContributionContext(
        assignment.population_name,
        assignment.task_id,
        assignment.round,
        assignment.aggregation_id,
        assignment.assignment_id,
        assignment.encryption_key.key_id,
        assignment.model_version,
        assignment.plan.sha256_hex,
        policy_from_message(assignment.access_policy.policy).sha256_hex(),
    )
    assert derived == context()
    assert hashlib.sha256(plan["plan_json"].encode()).hexdigest() == plan["sha256_hex"]
    assert len(plan["plan_json"].encode()) == plan["size_bytes"]


def test_contribution_context() -> None:
    v = vectors()["contribution_context"]
    encoded = context().encode()
    assert encoded.hex() == v["encoded_hex"] == joined(v["fields"])
    assert ContributionContext.decode(encoded) == context()
    assert v["input"]["policy_sha256_hex"] == vectors()["access_policies"][0]["sha256_hex"]
    assert v["input"]["plan_sha256_hex"] == vectors()["plan"]["sha256_hex"]


def test_hpke_vector_opens_and_reproduces() -> None:
    h = vectors()["hpke"]
    recipient = hpke.load_private(bytes.fromhex(h["recipient_private_key_hex"]))
    ephemeral = hpke.load_private(bytes.fromhex(h["ephemeral_private_key_hex"]))
    info = bytes.fromhex(h["info_hex"])
    plaintext = bytes.fromhex(h["plaintext_hex"])
    sealed = bytes.fromhex(h["ciphertext_hex"])
    assert (h["kem_id"], h["kdf_id"], h["aead_id"], h["mode"], h["aad_hex"]) == (0x20, 1, 3, 0, "")
    assert info == context().encode()
    assert hpke.public_bytes(recipient.public_key()).hex() == h["recipient_public_key_hex"]
    assert hpke.public_bytes(ephemeral.public_key()).hex() == h["enc_hex"] == sealed[: hpke.ENC_BYTES].hex()
    assert len(sealed) == hpke.ENC_BYTES + len(plaintext) + hpke.TAG_BYTES
    # fedcompute's own open (cryptography's RFC 9180 HPKE, aad empty) accepts the vector...
    assert hpke.open_sealed(sealed, recipient, info) == plaintext
    with pytest.raises(hpke.DecryptionError):
        hpke.open_sealed(sealed, recipient, info[:-1] + b"0")
    # ...whose key schedule is the one stored, with an empty aad...
    key, nonce = bytes.fromhex(h["key_hex"]), bytes.fromhex(h["base_nonce_hex"])
    assert ChaCha20Poly1305(key).decrypt(nonce, sealed[hpke.ENC_BYTES :], b"") == plaintext
    steps = script().hpke_seal_deterministic(recipient.public_key(), ephemeral, info, b"", plaintext)
    assert {k: bytes(v).hex() for k, v in steps.items()} == {
        "enc": h["enc_hex"],
        "shared_secret": h["shared_secret_hex"],
        "key_schedule_context": h["key_schedule_context_hex"],
        "key": h["key_hex"],
        "base_nonce": h["base_nonce_hex"],
        "ciphertext": h["ciphertext_hex"],
    }
    # ...and fedcompute's seal (fresh ephemeral key) opens with the same recipient key.
    assert hpke.open_sealed(hpke.seal(plaintext, recipient.public_key(), info), recipient, info) == plaintext


def test_envelope_and_upload_metadata() -> None:
    e = vectors()["envelope"]
    data = bytes.fromhex(e["serialized_hex"])
    envelope = parse_envelope(data)
    check_envelope(data, context())
    assert envelope.version == 1
    assert envelope.key_id == context().key_id
    assert envelope.context == context().encode()
    assert envelope.ciphertext.hex() == vectors()["hpke"]["ciphertext_hex"]
    assert e["upload_metadata"] == {"total_size_bytes": len(data), "sha256_hex": hashlib.sha256(data).hexdigest()}
    assert re.fullmatch(r"uploads/asg_[A-Za-z0-9_-]+", e["upload_resource_name"])


def test_update_payload() -> None:
    import torch

    from fedcompute.core import checkpoints

    p = vectors()["payload"]
    assert script().payload_vector() == p
    tensors = {
        "0.weight": (torch.arange(640, dtype=torch.float32).reshape(10, 64) - 320) / 256,
        "0.bias": (torch.arange(10, dtype=torch.float32) - 5) / 8,
    }
    assert set(tensors) == set(checkpoints.initial_weights(p["architecture"], 0))
    data = checkpoints.encode(tensors, p["metadata"])
    assert data.hex() == p["payload_hex"]
    assert len(data) == p["size_bytes"]
    assert hashlib.sha256(data).hexdigest() == p["sha256_hex"]
    header_len = int.from_bytes(data[:8], "little")
    assert header_len == p["header_length"]
    assert header_len % 8 == 0
    assert data[8 : 8 + header_len].decode() == p["header_json"] + " " * p["header_padding_spaces"]
    assert checkpoints.decode_metadata(data) == p["metadata"]
    body = data[8 + header_len :]
    assert body[:40].hex() == p["bias_data_hex"]
    assert hashlib.sha256(body[40:]).hexdigest() == p["weight_data_sha256_hex"]
    decoded = checkpoints.decode(data)
    assert all(torch.equal(decoded[k], tensors[k]) for k in tensors)


def test_input_set_digest() -> None:
    s = vectors()["input_set"]
    pairs = [(p["assignment_id"], p["envelope_sha256_hex"]) for p in s["pairs"]]
    assert input_set_digest(pairs) == s["digest_hex"] == hashlib.sha256(bytes.fromhex(s["preimage_hex"])).hexdigest()
    assert joined(s["fields"]) == s["preimage_hex"]
    assert pairs[0] == (context().assignment_id, vectors()["envelope"]["upload_metadata"]["sha256_hex"])


def test_auditor_vectors() -> None:
    a = vectors()["auditor"]
    i = a["release_binding"]["input"]
    binding = ReleaseBinding(
        bytes.fromhex(i["recipient_public_key_hex"]),
        i["key_id"],
        i["task_id"],
        i["round"],
        i["aggregation_id"],
        i["job_id"],
        i["input_set_sha256_hex"],
        i["policy_sha256_hex"],
        i["release_number"],
    )
    assert binding.digest() == a["release_binding"]["digest_b64url"]
    preimage = bytes.fromhex(joined(a["release_binding"]["fields"]))
    assert hashlib.sha256(preimage).hexdigest() == a["release_binding"]["sha256_hex"]
    assert b64url(hashlib.sha256(preimage).digest()) == binding.digest()
    assert i["input_set_sha256_hex"] == vectors()["input_set"]["digest_hex"]
    rc = a["release_context"]["input"]
    released = release_context(binding, rc["provider_id"], rc["share_index"], rc["result_id"])
    assert released.hex() == a["release_context"]["encoded_hex"] == joined(a["release_context"]["fields"])
    ic = a["import_context"]["input"]
    imported = import_context(ic["key_id"], ic["provider_id"], ic["share_index"])
    assert imported.hex() == a["import_context"]["encoded_hex"] == joined(a["import_context"]["fields"])
    entry = a["release_log_entry"]
    body = entry["body_json"].encode()
    assert canonical(json.loads(body)) == body
    assert json.loads(body)["prev"] == GENESIS
    logged = json.loads(body)  # the attempt the entry names: the binding's recipient, job and release number
    assert (logged["recipient"], logged["job_id"], logged["release_number"]) == (
        i["recipient_public_key_hex"],
        i["job_id"],
        i["release_number"],
    )
    assert hashlib.sha256(body).hexdigest() == entry["body_sha256_hex"]
    signed = SignedEntry(body, bytes.fromhex(entry["signature_der_hex"]))
    assert verify_entries([signed], "kp-1", trusted()["kp-1"])[0]["seq"] == 0


def _leaves(node: object, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, (*path, str(k)))]
    if isinstance(node, list):
        return [leaf for item in node for leaf in _leaves(item, path)]
    if isinstance(node, bool) or node is None:
        return []
    return [(path, str(node))]


def test_protocol_md_states_every_vector() -> None:
    page = PROTOCOL_PATH.read_text()
    flat = compact(page)
    missing = [
        "/".join(path)
        for path, value in _leaves(vectors())
        if path[-2:] not in JSON_ONLY and path != ("about",) and compact(value) not in flat
    ]
    assert missing == []
    assert "test-vectors.json" in page
    assert vectors()["payload"]["sha256_hex"] in page


def test_protocol_md_test_vectors_section_is_generated() -> None:
    """The page's "Test vectors" section is what ``make_test_vectors.py --markdown`` prints (modulo whitespace)."""
    assert compact(script().markdown(vectors())) in compact(PROTOCOL_PATH.read_text())
