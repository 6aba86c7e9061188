#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets: fuzz/seeds/<target>/<name>.

A few valid inputs per target, so fuzzing starts past the outer layers. The device messages come
from the protocol test vectors in docs/protocol.md (which a test keeps byte-exact with the Rust
encoder); the rest is built here with a small CBOR encoder. Signed offers need the `cryptography`
package (Ed25519); without it they are skipped and the existing files are kept.

    python3 fuzz/generate-seeds.py          # rewrites the seeds
"""
import hashlib
import json
import pathlib
import re
import struct

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEEDS = ROOT / "fuzz" / "seeds"

# ----------------------------------------------------------------------------- CBOR (packed)


def head(major, n):
    if n < 24:
        return bytes([major << 5 | n])
    if n < 256:
        return bytes([major << 5 | 24, n])
    if n < 65536:
        return bytes([major << 5 | 25]) + struct.pack(">H", n)
    if n < 2**32:
        return bytes([major << 5 | 26]) + struct.pack(">I", n)
    return bytes([major << 5 | 27]) + struct.pack(">Q", n)


class F16(float):
    pass


def cbor(v):
    if v is None:
        return b"\xf6"
    if v is True:
        return b"\xf5"
    if v is False:
        return b"\xf4"
    if isinstance(v, F16):
        return b"\xf9" + struct.pack(">e", v)
    if isinstance(v, float):
        return b"\xfa" + struct.pack(">f", v)
    if isinstance(v, int):
        return head(0, v) if v >= 0 else head(1, -1 - v)
    if isinstance(v, (bytes, bytearray)):
        return head(2, len(v)) + bytes(v)
    if isinstance(v, str):
        b = v.encode()
        return head(3, len(b)) + b
    if isinstance(v, list):
        return head(4, len(v)) + b"".join(cbor(x) for x in v)
    if isinstance(v, dict):
        return head(5, len(v)) + b"".join(cbor(k) + cbor(x) for k, x in v.items())
    raise TypeError(v)


def packed(*fields):
    """A struct in serde_cbor's packed form: {0: f0, 1: f1, ...}."""
    return cbor({i: f for i, f in enumerate(fields)})


# ----------------------------------------------------------------------------- counts bitstream


class Bits:
    def __init__(self):
        self.bits = []

    def put(self, value, n):
        for i in reversed(range(n)):
            self.bits.append((value >> i) & 1)

    def vector(self, values, k=0):
        self.put(k, 4)
        for v in values:
            w = v + (1 << k)
            n = w.bit_length()
            self.put(0, n - k - 1)
            self.put(w, n)

    def bytes(self):
        bits = self.bits + [0] * (-len(self.bits) % 8)
        return bytes(
            int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8)
        )


# ----------------------------------------------------------------------------- vectors


def vectors():
    text = (ROOT / "docs" / "protocol.md").read_text()
    out = {}
    for name, body in re.findall(r"```vector (\S+)\n(.*?)```", text, re.S):
        out[name] = bytes.fromhex("".join(body.split()))
    return out


def unwrap(envelope):
    """The payload of a fixed-form COSE_Mac0 envelope."""
    rest = envelope[7:]
    h = rest[0]
    if 0x40 <= h <= 0x57:
        n, rest = h & 0x1F, rest[1:]
    elif h == 0x58:
        n, rest = rest[1], rest[2:]
    else:
        n, rest = struct.unpack(">H", rest[1:3])[0], rest[3:]
    return rest[:n]


def frame(b):
    return struct.pack("<H", len(b)) + b


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# ----------------------------------------------------------------------------- seeds


def summary_body(shape, counts_vectors, moments, profile=1, seq=0):
    bits = Bits()
    for v in counts_vectors:
        bits.vector(v, k=2)
    health = packed(1, 3300, 10240, -70, 0)
    return packed(1, seq, profile, 60000, 60000, None, shape, bits.bytes(),
                  [F16(m) for m in moments], health)


def sim_summary(seq=0, labelled=False):
    """A summary of the drift simulator's shape: 8 features x 16 bins, 4 classes, 8 confidence
    bins, 8 latency bins; 64 inferences."""
    n = 64
    feat = [4] * 16 + [0, 0, 0]
    conf = [0] * 32
    for c in range(4):
        conf[c * 8 + 6] = 16
    lat = [0, 32, 32, 0, 0, 0, 0, 0, 0, 0, 0]
    vecs = [feat] * 8 + [conf, lat]
    if labelled:
        conf_m = [0] * 16
        for c in range(4):
            conf_m[c * 4 + c] = 3
        vecs.append(conf_m)
    return summary_body([8, 16, 4, 8, 8, labelled], vecs, [0.5, 0.15] * 8, seq=seq)


def xorshift_base(length=8 * 1024):
    x = 0x12345678
    out = bytearray()
    for i in range(length):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out.append(0 if (i // 512) % 3 == 0 else x >> 24)
    return bytes(out)


def lz4_literals(data):
    """An LZ4 block that is only literals (valid for any data)."""
    n = len(data)
    token = min(n, 15) << 4
    out = bytearray([token])
    if n >= 15:
        rest = n - 15
        while rest >= 255:
            out.append(255)
            rest -= 255
        out.append(rest)
    return bytes(out) + data


def patch_header(block, target, base):
    return b"TFP1" + struct.pack("<HHII", block, 0, target, base)


def patches():
    base = xorshift_base()
    block = 1024
    # COPY the first 4 blocks, LITERAL one, ADD raw +1 over block 5.
    p = patch_header(block, 6 * block, len(base))
    for i in range(4):
        p += bytes([0]) + struct.pack("<I", i * block)
    lit = bytes((i * 7) & 0xFF for i in range(block))
    p += bytes([2]) + struct.pack("<H", block) + lit
    p += bytes([1 | 0x40]) + struct.pack("<H", block) + b"\x01" * block
    yield "copy-literal-add", p
    # Rice k=0 of zero deltas (one 0 bit each), a sparse ADD with one change, LZ4 literal.
    p = patch_header(256, 3 * 256, len(base))
    p += bytes([1 | 1 << 2]) + struct.pack("<I", 512) + struct.pack("<H", 32) + b"\x00" * 32
    # sparse g=0: gap 5 -> Exp-Golomb(0) of 5: 5+1=6=0b110 -> n=2: "11" "0" then low 2 bits
    # "01"... build it bit by bit, LSB first.
    bits = []

    def eg(v, g):
        w = v + (1 << g)
        n = w.bit_length() - 1
        bits.extend([1] * (n - g) + [0])
        bits.extend((w >> i) & 1 for i in range(n))

    eg(5, 0)  # gap
    eg(1, 0)  # value z - 1 = 1 -> z = 2 -> +1
    eg(250, 0)  # gap to the end: 5 + 1 + 250 = 256
    bits += [0] * (-len(bits) % 8)
    sparse = bytes(sum(b << i for i, b in enumerate(bits[j : j + 8])) for j in range(0, len(bits), 8))
    p += bytes([1 | 4 << 2 | 0x40]) + struct.pack("<H", len(sparse)) + sparse
    lz = lz4_literals(bytes(range(256)))
    p += bytes([2 | 0x20]) + struct.pack("<H", len(lz)) + lz
    yield "rice-sparse-lz4", p
    yield "empty-target", patch_header(1024, 0, 0)


def manifest(seq, image, delta=None, golden=None, extra=None):
    sha = hashlib.sha256(image).digest()
    fields = {
        0: "kws", 1: "2026.11.2", 2: seq, 3: "nrf52840", 4: len(image), 5: sha,
        6: delta, 7: 1024, 8: "https://ota.example/objects/x",
        9: delta[2] if delta else sha, 10: 0, 11: 40000, 12: golden,
    }
    if extra:
        fields.update(extra)
    return cbor(fields)


def sign(payload):
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        return None
    key = Ed25519PrivateKey.from_private_bytes(bytes([7] * 32))
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    kid = hashlib.sha256(public).digest()[:8]
    protected = bytes([0xA2, 0x01, 0x27, 0x04, 0x48]) + kid
    tbs = cbor(["Signature1", protected, b"", payload])
    sig = key.sign(tbs)
    return b"\xd2\x84" + cbor(protected) + b"\xa0" + cbor(payload) + b"\x58\x40" + sig


def profile_json():
    """A small valid monitoring profile: 2 features x 4 bins, 3 classes, 2 confidence bins."""
    n = 40
    hist = lambda lo, upper, counts: {  # noqa: E731
        "lo": lo, "upper": upper, "counts": counts, "underflow": 1, "overflow": 1, "nan": 0,
    }
    return json.dumps({
        "model_id": "kws", "model_version": "3", "n": n,
        "features": [
            {"name": "f0", "hist": hist(0.0, [1.0, 2.0, 3.0, 4.0], [10, 9, 10, 9])},
            {"name": "f1", "hist": hist(-1.0, [0.0, 0.5, 1.0, 3.0], [9, 10, 9, 10])},
        ],
        "classes": [20, 10, 10],
        "confidence": [[5, 15], [5, 5], [2, 8]],
        "conf_bins": 2,
        "calibration": [0.5, 0.9],
        "calibration_n": [10, 20],
        "accuracy": 0.8,
        "labelled": 30,
        "latency": hist(0.0, [1000.0, 2000.0], [20, 18]),
    }, indent=1).encode()


def main():
    v = vectors()
    topics = {
        "hello": "tf/v1/vec-1/hello", "will": "tf/v1/vec-1/will", "summary": "tf/v1/vec-1/sum",
        "progress": "tf/v1/vec-1/ota/prog", "block-request": "tf/v1/vec-1/ota/breq",
    }
    sealed_kind = {"summary": 0, "hello": 1, "will": 2, "progress": 3, "block-request": 4}
    ingest_topic = {"summary": 0, "hello": 1, "will": 2, "progress": 3, "block-request": 4}
    for name, topic in topics.items():
        env = v[name]
        body = unwrap(env)
        write("cose_mac0", name, frame(topic.encode()) + env)
        write("device_bodies", name, frame(topic.encode()) + body)
        write("ingest_verify", name, bytes([ingest_topic[name]]) + env)
        write("ingest_verify", name + "-topic", bytes([6]) + frame(topic.encode()) + env)
        write("ingest_sealed", name, bytes([sealed_kind[name]]) + body)
    summary = unwrap(v["summary"])
    write("summary_decode", "vector", summary)
    write("summary_decode", "sim-shape", sim_summary())
    write("summary_decode", "sim-shape-labelled", sim_summary(labelled=True))
    write("ingest_sealed", "sim-shape", bytes([0]) + sim_summary(labelled=True))
    write("drift_window", "vector", bytes([0]) + frame(summary))
    write("drift_window", "sim-shape",
          b"".join(bytes([i % 3]) + frame(sim_summary(seq=i, labelled=i % 2 == 1))
                   for i in range(6)))
    # counts: [n][lens u16...][stream]; the vector's shape [2, 4, 3, 2, 2, true].
    counts = summary[summary.index(b"\x07\x4b") + 2 :][:11]
    write("counts", "vector", bytes([5]) + struct.pack("<5H", 7, 7, 6, 5, 9) + counts)
    write("counts", "doc-example", bytes([1]) + struct.pack("<H", 4) + bytes.fromhex("0a64"))
    big = Bits()
    big.vector([0, 1, 2**32 - 1, 77] * 4, k=15)
    write("counts", "large-values", bytes([1]) + struct.pack("<H", 16) + big.bytes())
    # Blocks.
    write("block_decode", "vector", v["block"])
    write("block_decode", "unknown-key",
          cbor({0: b"\xab" * 32, 1: 0, 2: 10, 3: b"0123456789", 9: [1, {2: "x"}]}))
    breq = unwrap(v["block-request"])
    write("block_request", "vector-named", b"\x00" + breq)
    write("block_request", "at-end", b"\x00" + packed(1, 2, b"\xab" * 32, 9990, 4096))
    # Manifests and offers.
    image = bytes(range(256)) * 20
    base = bytes(200) * 10
    patch = b"TFP1" + bytes(12)
    delta = [hashlib.sha256(base).digest(), len(patch), hashlib.sha256(patch).digest(), len(base)]
    manifests = {
        "full": manifest(2, image),
        "delta": manifest(3, image, delta=delta),
        "golden": manifest(4, image, golden=[3, hashlib.sha256(b"g").digest()]),
        "future-key": manifest(5, image, extra={13: {"x": [1, 2, 3]}}),
    }
    for name, m in manifests.items():
        write("manifest_signed", name, m)
        offer = sign(m)
        if offer is not None:
            write("offer_verify", name, offer)
            write("installer_blocks", "signed-" + name, b"\x05\x03" + frame(m) + b"\x00")
    # Patches: [pick][n chunks][chunk u16 x n][patch].
    for name, p in patches():
        write("patch", name, b"\x03\x01" + struct.pack("<H", 100) + p)
    # Installer programs: take an offer, fetch genuine blocks, switch, reboot, self-test.
    for name, which in [("full-install", 0), ("delta-install", 1)]:
        prog = bytes([5, which, 0])
        prog += (bytes([0, 2]) + struct.pack("<H", 2047) + bytes(3)) * 12
        # Switch (the installer asks for a reboot: a power cycle), pass the self-test in the
        # trial boot, power cycle again.
        prog += bytes([7, 8, 0, 9])
        write("installer_blocks", name, prog)
    write("installer_blocks", "power-cut",
          bytes([5, 1, 1]) + (bytes([0, 2]) + struct.pack("<H", 700) + bytes(3)) * 3 + bytes([9])
          + (bytes([0, 2]) + struct.pack("<H", 2047) + bytes(3)) * 10 + bytes([6]))
    # Configuration: the documented defaults, a full file, environment overrides.
    default = (ROOT / "src" / "default-config.toml").read_bytes()
    write("config_toml", "default", default)
    full = b"""data_dir = "/tmp/tf"
[broker]
listen = "127.0.0.1:0"
[ingest]
flush_ms = 20
window_secs = 60
[api]
listen = "127.0.0.1:0"
[[api.tokens]]
name = "ops"
token = "operator-token-for-tests-0123456789"
role = "operator"
[[api.tokens]]
name = "viewer"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
role = "read"
[influx]
url = "http://127.0.0.1:8086"
org = "fleet"
bucket = "tinyfleet"
token = "influx-token"
[[alerts.receivers]]
name = "ops"
kind = { type = "alertmanager_webhook", url = "http://user:pw@127.0.0.1:9/hook?x=1" }
[[alerts.receivers]]
name = "retrain"
kind = { type = "github_dispatch", owner = "acme", repo = "models" }
bearer_token = "ghp_x"
"""
    write("config_toml", "full", full)
    write("config_toml", "overrides",
          full + b"\x00API__LISTEN=0.0.0.0:9\x00INGEST__WINDOW_SECS=120"
          b"\x00API__TOKENS__2__NAME=x\x00MQTT__HOST=broker")
    # Regression seeds: durations that overflowed once turned into milliseconds.
    write("config_toml", "huge-checkpoint", b"[ingest]\ncheckpoint_ms = 9223372036854775807\n")
    write("config_toml", "huge-retention", b"[ingest]\nretention_days = 213503982334602\n")
    write("config_toml", "huge-offline-env", b"\x00INGEST__OFFLINE_AFTER_SECS=18446744073709551")
    write("profile_upload", "small", profile_json())
    # Regression seeds: counts that overflow u64 but saturate to n (refused), and the largest
    # counts that sum to n exactly (accepted).
    m = 2**64 - 1

    def hist(lo, upper, counts, u=0):
        return {"lo": lo, "upper": upper, "counts": counts, "underflow": u, "overflow": 0,
                "nan": 0}

    write("profile_upload", "saturating-counts", json.dumps({
        "model_id": "kws", "model_version": "3", "n": m,
        "features": [{"name": "f0", "hist": hist(0.0, [1.0, 2.0], [m, 5])}],
        "classes": [m], "confidence": [[m]], "conf_bins": 1, "calibration": [0.5],
        "calibration_n": [0], "accuracy": None, "labelled": 0,
        "latency": hist(0.0, [1000.0], [m], 3)}).encode())
    write("profile_upload", "max-counts", json.dumps({
        "model_id": "kws", "model_version": "3", "n": m,
        "features": [{"name": "f0", "hist": hist(0.0, [1.0, 2.0], [m - 5, 5])},
                     {"name": "f1", "hist": hist(-1e38, [3e38], [m])}],
        "classes": [m - 1, 1], "confidence": [[m - 1], [1]], "conf_bins": 1,
        "calibration": [1.0], "calibration_n": [m], "accuracy": 1.0, "labelled": m,
        "latency": hist(0.0, [1000.0], [m - 3], 3)}).encode())


if __name__ == "__main__":
    main()
