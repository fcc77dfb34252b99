#!/usr/bin/env python3
"""Creates an SQS queue (if needed) and sends message bodies to it, one per input line, in batches of 10.

Runs in the LocalStack virtualenv (it has boto3). Prints the queue URL on stdout.
"""
import argparse
import concurrent.futures
import sys

import boto3


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--endpoint", required=True, help="e.g. http://localhost:4566")
    ap.add_argument("--queue", required=True, help="queue name")
    ap.add_argument("--visibility-timeout", type=int, default=30)
    ap.add_argument("--file", default="-", help="bodies, one per line ('-' for stdin)")
    args = ap.parse_args()
    sqs = boto3.client("sqs", endpoint_url=args.endpoint, region_name="us-east-1",
                       aws_access_key_id="test", aws_secret_access_key="test")
    url = sqs.create_queue(QueueName=args.queue,
                           Attributes={"VisibilityTimeout": str(args.visibility_timeout)})["QueueUrl"]
    src = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
    bodies = [line.rstrip("\n") for line in src if line.strip()]
    batches = [bodies[i:i + 10] for i in range(0, len(bodies), 10)]

    def send(batch):
        out = sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": b} for i, b in enumerate(batch)])
        if out.get("Failed"):
            raise SystemExit(f"send failed: {out['Failed']}")
        return len(batch)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        sent = sum(pool.map(send, batches))
    print(url)
    print(f"sent {sent} messages to {url}", file=sys.stderr)


if __name__ == "__main__":
    main()
