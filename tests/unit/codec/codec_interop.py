#!/usr/bin/python3
"""Interop peer for test_codec_interop.c: the envelope format written and
read by an independent implementation (Python's msgpack, Debian package
python3-msgpack), following docs/wire-format.md and nothing else.

    codec_interop.py gen     writes frames built here, one case per entry:
                               OK <frame hex>
                               <dump line of the fields the frame holds>
                             or
                               ERR <frame hex> <expected BUS_E* name>
    codec_interop.py check   reads frames (one hex line each) on stdin,
                             decodes each with msgpack.unpackb(raw=False),
                             checks the types the spec requires and prints
                               keys=<keys in frame order> <dump line>

The dump line is the format of codec_test_util.h: strings as hex of their
UTF-8 bytes, so both sides compare plain text. Exits 77 when msgpack is
missing (the C test then skips), 1 on a spec violation (reason on stderr).
"""
import sys

try:
    import msgpack
except ImportError:
    sys.stderr.write("python3-msgpack is not installed\n")
    sys.exit(77)

ID = bytes.fromhex("0190c1a23b4c7d5e8f60718293a4b5c6")
KNOWN = ("v", "id", "type", "sv", "stream", "sver", "pos", "ts", "h", "p")


def hx(s):
    return s.encode("utf-8").hex()


def dump(d):
    """The fields of a decoded envelope, defaults applied (spec table)."""
    h = d.get("h", {})
    return " ".join([
        "id=" + d["id"].hex(),
        "type=" + hx(d["type"]),
        "sv=%d" % d.get("sv", 1),
        "stream=" + (hx(d["stream"]) if "stream" in d else "-"),
        "sver=%d" % d.get("sver", 0),
        "pos=%d" % d.get("pos", 0),
        "ts=%d" % d["ts"],
        "h=" + ",".join(hx(k) + ":" + hx(v) for k, v in h.items()),
        "p=" + d["p"].hex(),
    ])


class Raw:
    """A value already encoded: for bytes msgpack would refuse to write."""

    def __init__(self, data):
        self.data = data


def pack_pairs(pairs, count=None):
    """A map from (key, value) pairs, duplicates allowed; Raw values and
    keys are copied as they are."""
    p = msgpack.Packer()
    out = p.pack_map_header(len(pairs) if count is None else count)
    for k, v in pairs:
        for x in (k, v):
            out += x.data if isinstance(x, Raw) else p.pack(x)
    return out


def base():
    return {"v": 1, "id": ID, "type": "orders.placed",
            "ts": 1700000000123456789, "p": b"\x01\x02"}


def valid_cases():
    yield {"v": 1, "id": ID, "type": "a", "ts": 0, "p": b""}
    yield {
        "v": 1, "id": ID, "type": "commandes.passées ✓", "sv": 3,
        "stream": "客户-42", "sver": 7, "pos": 2**64 - 1,
        "ts": -1234567890123,
        "h": {"correlation-id": "0190c1a2-3b4c-7d5e-8f60-718293a4b5c6",
              "clé": "välue \U0001F680", "empty": ""},
        "p": bytes(range(256)) * 300,  # 76800 bytes: bin32
    }
    # Keys in another order, with unknown keys of several types (nested
    # containers, float, bool, nil) before, between and after known ones.
    yield {
        "p": b"payload", "x-future": {"nested": [1, 2.5, None, {"a": b"b"}]},
        "h": {"b": "2", "a": "1"}, "ts": 42, "pos": 9, "sver": 3,
        "stream": "s-1", "zz": True, "sv": 2, "type": "t.reordered",
        "id": ID, "v": 1, "last": None,
    }
    # Defaults written out explicitly (not canonical, still valid), an empty
    # stream, an str8 type and an str16 header value.
    yield {"v": 1, "id": ID, "type": "t" * 40, "sv": 1, "stream": "",
           "sver": 0, "pos": 0, "ts": 2**63 - 1,
           "h": {"long": "x" * 300}, "p": b"\x00"}
    yield {"v": 1, "id": ID, "type": "t", "ts": -2**63, "pos": 2**32,
           "p": b"z" * 65536}
    yield dict(base(), h={"k%02d" % i: "v%d" % i for i in range(40)})


def error_cases():
    b = base()
    yield pack_pairs(list(dict(b, v=2).items())), "BUS_EVERSION"
    yield pack_pairs(list(dict(b, v=0).items())), "BUS_EPROTO"
    yield pack_pairs(list(dict(b, id=ID[:15]).items())), "BUS_EPROTO"
    yield pack_pairs(list(dict(b, id=ID.hex()).items())), "BUS_EPROTO"
    yield pack_pairs(list(b.items()) + [("type", "again")]), "BUS_EPROTO"
    yield pack_pairs(list(dict(b, h=Raw(b"\x82\xa1k\xa1v\xa1k\xa1w"))
                          .items())), "BUS_EPROTO"
    yield pack_pairs(list(b.items())) + b"\x00", "BUS_EPROTO"
    yield pack_pairs(list(dict(b, type=b"bytes").items())), "BUS_EPROTO"
    yield pack_pairs([kv for kv in b.items() if kv[0] != "p"]), "BUS_EPROTO"
    yield msgpack.packb(list(b.values())), "BUS_EPROTO"
    yield pack_pairs(list(dict(b, type=Raw(b"\xa2\xc3\x28")).items())), \
        "BUS_EPROTO"
    yield pack_pairs(list(dict(b, ts=1.5).items())), "BUS_EPROTO"
    yield pack_pairs(list(dict(b, sv=0).items())), "BUS_EPROTO"
    yield pack_pairs(list(dict(b, type="t" * 5000).items())), "BUS_ETOOBIG"
    yield pack_pairs(list(dict(b, h={"k%d" % i: "" for i in range(65)})
                          .items())), "BUS_ETOOBIG"
    yield pack_pairs(list(b.items()))[:-1], "BUS_EPROTO"
    yield b"\xdd\xff\xff\xff\xff", "BUS_EPROTO"


def gen():
    out = sys.stdout
    for d in valid_cases():
        out.write("OK %s\n%s\n" % (msgpack.packb(d, use_bin_type=True).hex(),
                                   dump(d)))
    for frame, err in error_cases():
        out.write("ERR %s %s\n" % (frame.hex(), err))


def fail(i, why):
    sys.stderr.write("frame %d: %s\n" % (i, why))
    sys.exit(1)


def check():
    # Read everything before writing anything: the C side (bt_run) writes
    # all of stdin before it reads stdout, so answering early could fill
    # the stdout pipe and deadlock both processes.
    lines = sys.stdin.read().splitlines()
    for i, line in enumerate(lines):
        frame = bytes.fromhex(line.strip())
        # unpackb raises on trailing bytes (ExtraData) and truncation.
        d = msgpack.unpackb(frame, raw=False, strict_map_key=True)
        if not isinstance(d, dict):
            fail(i, "top level is not a map")
        for k in d:
            if k not in KNOWN:
                fail(i, "unknown key %r written" % k)
        if d.get("v") != 1 or type(d["v"]) is not int:
            fail(i, "v is not 1")
        if not isinstance(d.get("id"), bytes) or len(d["id"]) != 16:
            fail(i, "id is not bin of 16 bytes")
        if not isinstance(d.get("type"), str) or not d["type"]:
            fail(i, "type is not a non-empty str")
        for k in ("sv", "sver", "pos"):
            if k in d and (type(d[k]) is not int or d[k] < 0):
                fail(i, "%s is not a uint" % k)
        if "sv" in d and not 1 < d["sv"] < 2**32:
            fail(i, "sv written although 1, or out of range")
        for k in ("sver", "pos"):
            if k in d and d[k] == 0:
                fail(i, "%s written although 0" % k)
        if "stream" in d and not isinstance(d["stream"], str):
            fail(i, "stream is not a str")
        if type(d.get("ts")) is not int or not -2**63 <= d["ts"] < 2**63:
            fail(i, "ts is not a signed 64-bit int")
        if "h" in d:
            if not isinstance(d["h"], dict) or not d["h"]:
                fail(i, "h is not a non-empty map")
            for k, v in d["h"].items():
                if not isinstance(k, str) or not isinstance(v, str):
                    fail(i, "header is not str -> str")
        if not isinstance(d.get("p"), bytes):
            fail(i, "p is not bin")
        sys.stdout.write("keys=%s %s\n" % (",".join(d), dump(d)))


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("gen", "check"):
        sys.stderr.write("usage: codec_interop.py gen|check\n")
        sys.exit(2)
    gen() if sys.argv[1] == "gen" else check()
