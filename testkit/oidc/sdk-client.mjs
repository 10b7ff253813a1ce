// An MCP client built on the official TypeScript SDK that authenticates the way an OAuth 2.1
// client-credentials client does: it starts without a token, follows the server's 401 to the
// protected resource metadata and the authorization server's metadata, fetches a token for the
// server's resource, then initializes a session and calls tools. Used by shoal's auth tests.
//
//   node sdk-client.mjs <mcp-url> <client-id> <client-secret> <scope> <expected-issuer>
//
// Ends the session with DELETE. stdout: one JSON object {"requests": ["POST <url> -> 401", ...], "listed": [...tool names],
// "written": "<kv_get result>"}; the exit status is non-zero on any failure.

import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { ClientCredentialsProvider } from '@modelcontextprotocol/sdk/client/auth-extensions.js';

const [url, clientId, clientSecret, scope, expectedIssuer] = process.argv.slice(2);
if (!expectedIssuer) {
  console.error('usage: node sdk-client.mjs <mcp-url> <client-id> <client-secret> <scope> <issuer>');
  process.exit(2);
}

const requests = [];
const recordingFetch = async (target, init = {}) => {
  const response = await fetch(target, init);
  requests.push(`${init.method ?? 'GET'} ${target} -> ${response.status}`);
  return response;
};

const provider = new ClientCredentialsProvider({ clientId, clientSecret, scope, expectedIssuer });
const client = new Client({ name: 'shoal-sdk-auth-test', version: '1.0.0' });
const transport = new StreamableHTTPClientTransport(new URL(url), {
  authProvider: provider,
  fetch: recordingFetch,
});
const deadline = setTimeout(() => {
  console.error('timed out');
  process.exit(3);
}, 30_000);

await client.connect(transport);
const listed = (await client.listTools()).tools.map((tool) => tool.name);
await client.callTool({ name: 'kv_set', arguments: { key: 'sdk-auth', value: 'through the SDK' } });
const read = await client.callTool({ name: 'kv_get', arguments: { key: 'sdk-auth' } });
// Ends the session with DELETE (throws unless the answer is 2xx or 405).
await transport.terminateSession();
await client.close();
clearTimeout(deadline);
process.stdout.write(`${JSON.stringify({ requests, listed, written: read.content[0].text })}\n`);
