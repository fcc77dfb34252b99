#!/usr/bin/env python3
"""Groups `perf script -F comm,tid,period,ip,sym,dso` output (cpu-clock samples with call chains) of one backend
into where its CPU goes, per thread, in microseconds per message. Used by scripts/bench_profile.sh.

usage: perf script ... | profile_summary.py MESSAGES [--scale-main US] [--scale-net US]

Each sample goes to the first group below whose patterns match frames of its call chain (groups are ordered
from the most specific). Frames perf could not name count as "other"."""
import re
import sys
from collections import defaultdict

# (thread, group, pattern over one frame "symbol (dso)"). The main thread runs SQL; the network thread
# (sqs_ingest-net) runs tokio: HTTP, signing, JSON of the SQS API.
GROUPS = [
    ("net", "kernel: system calls (loopback TCP, epoll, futex)", r"entry_SYSCALL_64"),
    ("net", "SigV4 signing (aws-sigv4)", r"aws_sigv4::"),
    ("net", "ReceiveMessage JSON parse (serde_json)", r"sqs_json::parse_receive"),
    ("net", "other SQS JSON (request bodies, responses)", r"serde_json::|sqs_json::"),
    ("net", "HTTP/1 client (hyper, httparse)", r"hyper::proto|httparse|hyper_util::client::legacy::client::Client.*send_request|Buffered"),
    ("net", "tokio: epoll, timers, wake-ups", r"epoll|mio::|tokio::runtime::(io|time|park)|park_internal|futex|wake"),
    ("net", "memory (malloc, free, memcpy)", r"malloc|_int_free|realloc|memmove|memcpy|cfree|__rdl_"),
    ("main", "waiting on the network thread (parked in block_on)", (r"runtime::block_on", r"park")),
    ("main", "target insert (rows::insert_isolated, its savepoint)", r"rows::insert_isolated"),
    ("main", "ledger insert (SPI, switched to the extension owner)", (r"Run::store", r"privilege::as_owner")),
    ("main", "message JSON parse and validation (event::parse)", r"event::parse|event::validate|Mapping.*extract"),
    ("main", "masking (HMAC-SHA256 / AES-GCM-SIV)", r"mask::KeyMaterial|sha2::|aes|hmac"),
    ("main", "row arrays (Rows::push, into_datum)", r"Rows::push|into_datum|TextRows"),
    ("main", "transaction hold and post-commit deletes", r"sqs_ingest::hold::|sqs_ingest::xact::|CommitTransaction|XLogFlush"),
    ("main", "other SQL executor and SPI", r"ExecutorRun|SPI_|standard_Executor|PortalRun"),
    ("main", "memory (malloc, free, page faults)", r"malloc|_int_free|realloc|memmove|memcpy|exc_page_fault|palloc"),
]
# A pattern may be a tuple: every one of its regexes must match some frame.
COMPILED = [(t, g, [re.compile(x) for x in (p if isinstance(p, tuple) else (p,))]) for t, g, p in GROUPS]


def samples(lines):
    head, frames = None, []
    for line in lines:
        if not line.strip():
            if head:
                yield head, frames
            head, frames = None, []
        elif line[0] in " \t" and head:
            frames.append(line.strip().split(" ", 1)[-1])
        else:
            parts = line.split()
            head = (parts[0], int(parts[-1]))  # comm, period (ns)
    if head:
        yield head, frames


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("messages", type=int, help="messages the profiled call handled")
    ap.add_argument("--scale-main", type=float, help="main thread's us/message without perf: shares are scaled to it")
    ap.add_argument("--scale-net", type=float, help="the same for the network thread")
    args = ap.parse_args()
    n = args.messages
    per = defaultdict(lambda: defaultdict(int))
    totals = defaultdict(int)
    for (comm, period), frames in samples(sys.stdin):
        thread = "net" if comm.startswith("sqs_ingest-net") else "main"
        totals[thread] += period
        group = "other"
        for t, g, rxs in COMPILED:
            if t == thread and all(any(rx.search(f) for f in frames) for rx in rxs):
                group = g
                break
        per[thread][group] += period
    names = {"main": "main thread", "net": "network thread sqs_ingest-net"}
    scale = {"main": args.scale_main, "net": args.scale_net}
    for thread in ("main", "net"):
        total = totals[thread]
        sampled = total / 1e3 / n
        base = scale[thread] if scale[thread] is not None else sampled
        print(f"{names[thread]}: {base:.1f} us per message ({sampled:.1f} us under perf)")
        for group, ns in sorted(per[thread].items(), key=lambda kv: -kv[1]):
            share = ns / max(total, 1)
            print(f"  {group:<56} {share * base:6.1f} us  {100 * share:5.1f} %")


if __name__ == "__main__":
    main()
