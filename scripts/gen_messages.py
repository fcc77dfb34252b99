#!/usr/bin/env python3
"""Generates login events shaped like the production queue's, one JSON body per line.

Shapes follow what producers send: uuid user ids, versions as x.y.z, x.yy or x.y, about 30% null locales,
repeated devices and IPs (so masking's determinism shows), and optionally one malformed message.
Standard library only; `--seed` makes the output reproducible.
"""
import argparse
import json
import random
import uuid

LOCALES = ["RU", "PH", "US", "BR", "DE", "FR", "IN", "ID", "CN", "MX", "NG", "PL", "TR", "JP", "ZA"]


def version(rng):
    shape = rng.random()
    if shape < 0.5:
        return f"{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}"
    if shape < 0.8:
        return f"{rng.randint(0, 9)}.{rng.randint(10, 99)}"
    return f"{rng.randint(0, 9)}.{rng.randint(0, 9)}"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("count", type=int, help="number of messages (including the malformed one)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-malformed", action="store_true", help="omit the malformed message")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    devices = [(f"{rng.randint(100, 999)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
                rng.choice(["android", "ios"]),
                ".".join(str(rng.randint(1, 254)) for _ in range(4)),
                str(uuid.UUID(int=rng.getrandbits(128), version=4)))
               for _ in range(max(1, args.count * 2 // 3))]
    malformed_at = -1 if args.no_malformed or args.count == 0 else rng.randrange(args.count)
    for i in range(args.count):
        if i == malformed_at:
            print(json.dumps({"event": "heartbeat", "seq": i}))
            continue
        device_id, device_type, ip, user_id = rng.choice(devices)
        print(json.dumps({
            "user_id": user_id,
            "app_version": version(rng),
            "device_type": device_type,
            "ip": ip,
            "locale": None if rng.random() < 0.3 else rng.choice(LOCALES),
            "device_id": device_id,
        }))


if __name__ == "__main__":
    main()
