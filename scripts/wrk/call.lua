-- wrk script: one MCP tools/call (echo) per request, on one connection after another.
-- Environment: ERA (legacy | modern), SESSION (the Mcp-Session-Id of a legacy session), TOKEN (sent
-- as `Authorization: Bearer`, when set); SESSIONS (comma-separated session ids, one per wrk thread:
-- run it with as many threads as connections for one session per connection).
-- Every request has a JSON-RPC id of its own ("<thread>-<n>"): many connections share one legacy
-- session, and a request id must not be reused within a session while it is pending (JSON-RPC,
-- MCP); with one id for all, a server may only serve them one after another, and the benchmark
-- would measure that queue, not the server.
-- Counts the responses that are not 200 or carry no result (errors), and prints them at the end.
local era = os.getenv("ERA") or "legacy"
local session = os.getenv("SESSION")
local token = os.getenv("TOKEN")
local body
-- The body around the id.
local head = '{"jsonrpc":"2.0","id":"'
local tail
if era == "modern" then
  tail = '","method":"tools/call","params":{"name":"echo","arguments":{"text":"hello"},'
    .. '"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",'
    .. '"io.modelcontextprotocol/clientInfo":{"name":"wrk","version":"1"},'
    .. '"io.modelcontextprotocol/clientCapabilities":{}}}}'
else
  tail = '","method":"tools/call","params":{"name":"echo","arguments":{"text":"hello"}}}'
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end
if era == "modern" then
  wrk.headers["MCP-Protocol-Version"] = "2026-07-28"
  wrk.headers["Mcp-Method"] = "tools/call"
  wrk.headers["Mcp-Name"] = "echo"
else
  wrk.headers["MCP-Protocol-Version"] = "2025-11-25"
  wrk.headers["Mcp-Session-Id"] = session
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  bad = 0
  sent = 0
  local list = os.getenv("SESSIONS")
  if list and list ~= "" and era ~= "modern" then
    local n = 0
    for id in string.gmatch(list, "[^,]+") do
      n = n + 1
      if n == tid then wrk.headers["Mcp-Session-Id"] = id end
    end
  end
end

function request()
  sent = sent + 1
  return wrk.format(nil, nil, nil, head .. tid .. "-" .. sent .. tail)
end

function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"result"', 1, true) then
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local failed = 0
  for _, thread in ipairs(threads) do
    failed = failed + thread:get("bad")
  end
  io.write(string.format("WRK requests=%d seconds=%.3f failed=%d p50_ms=%.3f p99_ms=%.3f\n",
    summary.requests, summary.duration / 1e6, failed,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
