#!/usr/bin/env python3
"""Print the traces held by shoal-otlp-sink as indented trees.

Usage: scripts/trace-tree.py [SINK_URL] [--trace TRACE_ID] [--last N] [--attrs]

SINK_URL defaults to http://127.0.0.1:4318. Each line: span name, kind, duration, the replica
(service.instance.id) and, with --attrs, the span's attributes. Spans whose parent is not in the
sink (a client's span, or one dropped) are shown as roots of their trace.
"""
import argparse
import json
import sys
import urllib.request

KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("sink", nargs="?", default="http://127.0.0.1:4318")
    parser.add_argument("--trace", help="only this trace id")
    parser.add_argument("--last", type=int, default=5, help="the last N traces (default 5)")
    parser.add_argument("--attrs", action="store_true", help="print attributes")
    args = parser.parse_args()
    with urllib.request.urlopen(f"{args.sink.rstrip('/')}/api/spans", timeout=10) as response:
        spans = json.load(response)
    traces: dict[str, list[dict]] = {}
    for span in spans:
        traces.setdefault(span["trace_id"], []).append(span)
    ids = [args.trace] if args.trace else sorted(
        traces, key=lambda t: min(s["start_unix_nanos"] for s in traces[t])
    )[-args.last:]
    for trace_id in ids:
        members = traces.get(trace_id, [])
        if not members:
            print(f"trace {trace_id}: no spans", file=sys.stderr)
            continue
        by_id = {s["span_id"]: s for s in members}
        children: dict[str, list[dict]] = {}
        roots = []
        for span in members:
            if span["parent_span_id"] in by_id:
                children.setdefault(span["parent_span_id"], []).append(span)
            else:
                roots.append(span)
        print(f"trace {trace_id}")

        def show(span: dict, depth: int) -> None:
            ms = (span["end_unix_nanos"] - span["start_unix_nanos"]) / 1e6
            instance = span["resource"].get("service.instance.id", "?")
            error = "  ERROR" if span["status_code"] == 2 else ""
            print(f"{'  ' * (depth + 1)}{span['name']}  [{KINDS.get(span['kind'], '?')}, {ms:.2f} ms, {instance}]{error}")
            if args.attrs:
                for key, value in sorted(span["attributes"].items()):
                    print(f"{'  ' * (depth + 3)}{key} = {json.dumps(value)}")
            for child in sorted(children.get(span["span_id"], []), key=lambda s: s["start_unix_nanos"]):
                show(child, depth + 1)

        for root in sorted(roots, key=lambda s: s["start_unix_nanos"]):
            show(root, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
