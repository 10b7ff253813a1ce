// The echo tool on the official MCP TypeScript SDK: stateful Streamable HTTP, one transport per
// session, on Node's http server. Usage: node server.mjs [PORT]   (endpoint: /mcp)
import http from "node:http";
import { randomUUID } from "node:crypto";
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { isInitializeRequest } from "@modelcontextprotocol/sdk/types.js";
import { z } from "zod";

const port = Number(process.argv[2] ?? 8092);
const transports = new Map();

function echoServer() {
  const server = new McpServer({ name: "echo-ts", version: "1.0.0" });
  server.registerTool(
    "echo",
    { description: "Send the text back.", inputSchema: { text: z.string() } },
    async ({ text }) => ({ content: [{ type: "text", text }] }),
  );
  return server;
}

function fail(res, status, message) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify({ jsonrpc: "2.0", error: { code: -32000, message }, id: null }));
}

http
  .createServer(async (req, res) => {
    try {
      let body;
      if (req.method === "POST") {
        const chunks = [];
        for await (const chunk of req) chunks.push(chunk);
        body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
      }
      const sessionId = req.headers["mcp-session-id"];
      let transport = sessionId ? transports.get(sessionId) : undefined;
      if (!transport) {
        if (sessionId) return fail(res, 404, "unknown session");
        if (req.method !== "POST" || !isInitializeRequest(body)) return fail(res, 400, "no session");
        transport = new StreamableHTTPServerTransport({
          sessionIdGenerator: () => randomUUID(),
          onsessioninitialized: (id) => transports.set(id, transport),
        });
        transport.onclose = () => transport.sessionId && transports.delete(transport.sessionId);
        await echoServer().connect(transport);
      }
      await transport.handleRequest(req, res, body);
    } catch (error) {
      if (!res.headersSent) fail(res, 500, String(error));
    }
  })
  .listen(port, "127.0.0.1", () => console.error(`echo-ts: http://127.0.0.1:${port}/mcp`));
