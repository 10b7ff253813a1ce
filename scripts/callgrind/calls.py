"""Drives one MCP server for scripts/callgrind-calls.sh: `calls.py PORT open|call ERA [N] [SESSION]`.

open: opens a legacy session and prints its id. call: sends N `tools/call echo` requests, one
after another on one keep-alive connection (ERA legacy: on SESSION; modern: stateless 2026-07-28),
and exits non-zero unless every one answered 200 with a result.
"""
import http.client
import json
import sys

port, action, era = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
base = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


def post(body, headers):
    conn.request("POST", "/mcp", body=json.dumps(body), headers={**base, **headers})
    response = conn.getresponse()
    return response, response.read()


if action == "open":
    response, _ = post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "callgrind", "version": "1"}}}, {})
    session = response.getheader("mcp-session-id")
    post({"jsonrpc": "2.0", "method": "notifications/initialized"},
         {"mcp-session-id": session, "mcp-protocol-version": "2025-11-25"})
    print(session)
    sys.exit(0)

count = int(sys.argv[4])
params = {"name": "echo", "arguments": {"text": "hello"}}
if era == "legacy":
    headers = {"mcp-session-id": sys.argv[5], "mcp-protocol-version": "2025-11-25"}
else:
    headers = {"mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": "echo"}
    params["_meta"] = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                       "io.modelcontextprotocol/clientInfo": {"name": "callgrind", "version": "1"},
                       "io.modelcontextprotocol/clientCapabilities": {}}
failed = 0
for n in range(count):
    response, body = post({"jsonrpc": "2.0", "id": n + 1, "method": "tools/call", "params": params}, headers)
    if response.status != 200 or b'"result"' not in body:
        failed += 1
if failed:
    sys.exit(f"{failed} of {count} calls failed")
