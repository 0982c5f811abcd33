"""What durable commits cost: the store's outbox work for N messages with SQLite's
synchronous=FULL (the kit's setting: the commit that stores a message id before its POST reaches the
disk) against synchronous=NORMAL (which may lose the last commits on a power cut), in one run.

Each message goes through what a job does to the store: queued in batches with its body (one
transaction each, ids committed before sending), then sending, transmitted and acknowledged as
deferred moves written a batch at a time, as the engine's flusher writes them. Prints one JSON object.

    .venv/bin/python benchmarks/bench_durability.py --messages 20000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

from scr_nb.store.practice_store import Store

BODY = b"<message>" + b"x" * 6000 + b"</message>"   # about the size of a typical GP Summary


def run(folder: Path, synchronous: str, messages: int, batch: int) -> dict:
    store = Store(folder / f"{synchronous.lower()}.sqlite")
    store.db.execute(f"PRAGMA synchronous={synchronous}")
    store.sync_patients((f"P{n}", f"P{n}", f"{9990000000 + n}", n + 2, None, False)
                        for n in range(messages))
    job = store.start_job("run", "run", None, None, "555000000001", "bench", {})
    ids = [str(uuid.uuid4()).upper() for _ in range(messages)]
    commits = 0
    started = time.perf_counter()
    for start in range(0, messages, batch):
        chunk = range(start, min(messages, start + batch))
        store.queue_messages(job.id, job.chain_id, [(f"P{n}", ids[n], ids[n], None, "x", BODY)
                                                    for n in chunk])
        commits += 1
        for n in chunk:
            store.mark_sending(ids[n])
            store.mark_transmitted(ids[n], f"/poll/{n}", 1)
            store.mark_acknowledged(ids[n], ids[n])
        store.flush()
        commits += 1
    seconds = time.perf_counter() - started
    store.close()
    return {"synchronous": synchronous, "messages": messages, "seconds": round(seconds, 3),
            "messages_per_s": round(messages / seconds, 1), "commits": commits,
            "ms_per_commit": round(1000 * seconds / commits, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=16,
                        help="messages queued per transaction (the engine builds 2 x concurrency)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        results = [run(Path(tmp), mode, args.messages, args.batch) for mode in ("FULL", "NORMAL")]
    full, normal = results
    print(json.dumps({
        "benchmark": "durability", "batch": args.batch, "full": full, "normal": normal,
        "full_over_normal_rate": round(full["messages_per_s"] / normal["messages_per_s"], 3),
        "load_average": {"start": load_before, "end": os.getloadavg()},
    }, indent=2))


if __name__ == "__main__":
    main()
