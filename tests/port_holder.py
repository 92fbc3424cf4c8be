"""A process on a bus that holds switch ports and obeys the test over stdin/stdout.

    alacrity bus exec B -- python -m tests.port_holder DEVICE [COUNT]

It opens COUNT ports on DEVICE through the gate, prints one JSON line with their
MACs (or with the gate's error), then answers one line per command:
    send I HEX      -> "ok"             (frame HEX out of port I)
    recv I SECONDS  -> HEX or "none"    (next frame on port I)
    quit
"""

from __future__ import annotations

import json
import sys

from alacrity import client


def main() -> int:
    device, count = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1
    try:
        bus = client.connect()
        nics = [bus.open(device, timeout=5.0) for _ in range(count)]
    except (client.GateError, OSError) as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    print(json.dumps({"macs": [nic.mac.hex() for nic in nics]}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        nic = nics[int(words[1])]
        try:
            if words[0] == "send":
                nic.send(bytes.fromhex(words[2]))
                print("ok", flush=True)
            elif words[0] == "recv":
                frame = nic.recv(float(words[2]))
                print(frame.hex() if frame else "none", flush=True)
        except OSError as exc:
            print(f"error {exc}", flush=True)
    for nic in nics:
        nic.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
