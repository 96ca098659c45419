#!/usr/bin/python3
"""Interop peer for test_zmq_interop.c: a fanout publisher and subscriber
written with Debian's python3-zmq and python3-msgpack, following only
docs/wire-format.md (the envelope) and docs/brokers/zmq.md (the frames).

    zmq_interop.py pub N    binds an XPUB on tcp://127.0.0.1 (random port),
                            prints "ENDPOINT <endpoint>", waits for a
                            subscription, confirms it with the sync frame
                            [prefix][0xC1 "bus-sync"], publishes N events
                            [topic][envelope], prints "SENT N".
    zmq_interop.py sub EP N connects a SUB to EP, subscribes "interop.c.",
                            prints "READY", then for each of N events
                            checks the frames and the envelope's types and
                            prints one line:
                              EVENT <topic> <type> <stream> <sv> <sver>
                                    <n> <header k=v,...>
                            (control frames, first byte 0xC1, skipped).

Exits 77 when zmq or msgpack is missing (the C test then skips), 1 on a
violation of the spec (reason on stderr) or a timeout.
"""
import os
import struct
import sys
import time

try:
    import msgpack
    import zmq
except ImportError as e:
    sys.stderr.write("missing python module: %s\n" % e)
    sys.exit(77)

TIMEOUT_MS = 10000


def fail(why):
    sys.stderr.write("interop: %s\n" % why)
    sys.exit(1)


def uuid7():
    """A UUIDv7 as 16 big-endian bytes (RFC 9562)."""
    ms = time.time_ns() // 1000000
    rnd = bytearray(os.urandom(10))
    rnd[0] = 0x70 | (rnd[0] & 0x0F)  # version 7
    rnd[2] = 0x80 | (rnd[2] & 0x3F)  # variant
    return ms.to_bytes(6, "big") + bytes(rnd)


def envelope(i):
    """Event i, keys in the writers' order (wire-format.md, Writing)."""
    return msgpack.packb({
        "v": 1,
        "id": uuid7(),
        "type": "interop.created",
        "sv": 2,
        "stream": "py-%d" % i,
        "sver": i + 1,
        "ts": time.time_ns(),
        "h": {"correlation-id": "corr-%d" % i, "from": "python \u2713"},
        "p": struct.pack("<Q", i),
    }, use_bin_type=True)


def pub(n):
    ctx = zmq.Context()
    s = ctx.socket(zmq.XPUB)
    s.setsockopt(zmq.LINGER, 5000)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    print("ENDPOINT tcp://127.0.0.1:%d" % port, flush=True)
    if not s.poll(TIMEOUT_MS):
        fail("no subscription")
    sub = s.recv()
    if sub[:1] != b"\x01":
        fail("expected a subscription, got %r" % sub)
    prefix = sub[1:]
    s.send_multipart([prefix, b"\xc1bus-sync"])  # confirm it
    for i in range(n):
        s.send_multipart([b"interop.py.%d" % (i % 3), envelope(i)])
    print("SENT %d" % n, flush=True)
    s.close()
    ctx.term()


def check_types(d):
    if not isinstance(d, dict):
        fail("envelope is not a map")
    for k in d:
        if not isinstance(k, str):
            fail("key %r is not a str" % (k,))
    want = {"v": int, "id": bytes, "type": str, "ts": int, "p": bytes}
    for k, t in want.items():
        if not isinstance(d.get(k), t):
            fail("required key %s missing or not %s" % (k, t.__name__))
    if d["v"] != 1 or len(d["id"]) != 16 or d["type"] == "":
        fail("bad v, id or type")
    if d["id"][6] >> 4 != 7:
        fail("id is not a UUIDv7")
    opt = {"sv": int, "stream": str, "sver": int, "pos": int, "h": dict}
    for k, t in opt.items():
        if k in d and not isinstance(d[k], t):
            fail("key %s is not %s" % (k, t.__name__))
    for k, v in d.get("h", {}).items():
        if not isinstance(k, str) or not isinstance(v, str) or k == "":
            fail("bad header %r" % ((k, v),))
    if list(d)[0] != "v":
        fail("v is not the first key")


def sub(endpoint, n):
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"interop.c.")
    s.connect(endpoint)
    print("READY", flush=True)
    got = 0
    while got < n:
        if not s.poll(TIMEOUT_MS):
            fail("timed out after %d event(s)" % got)
        frames = s.recv_multipart()
        if len(frames) != 2:
            fail("%d frames, want [topic][envelope]" % len(frames))
        topic, env = frames
        if env[:1] == b"\xc1":
            continue  # a control frame (the subscription sync)
        d = msgpack.unpackb(env, raw=False)
        check_types(d)
        if len(d["p"]) != 8:
            fail("payload of %d bytes" % len(d["p"]))
        h = ",".join("%s=%s" % kv for kv in d.get("h", {}).items())
        print("EVENT %s %s %s %d %d %d %s" % (
            topic.decode("utf-8"), d["type"], d.get("stream", "-"),
            d.get("sv", 1), d.get("sver", 0),
            struct.unpack("<Q", d["p"])[0], h), flush=True)
        got += 1
    print("DONE", flush=True)
    s.close()
    ctx.term()


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "pub":
        pub(int(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "sub":
        sub(sys.argv[2], int(sys.argv[3]))
    else:
        fail("usage: zmq_interop.py pub N | sub ENDPOINT N")


if __name__ == "__main__":
    main()
