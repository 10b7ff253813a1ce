"""An MCP client built on the official Python SDK (`mcp`, pinned in requirements.txt): opens a
legacy (2025-11-25) session over Streamable HTTP, lists and calls tools, then closes, which makes
the SDK end the session with DELETE. Used by shoal's interop test.

    python sdk-client.py <mcp-url>

stdout: one JSON object {"protocol": "...", "listed": [...], "written": "...", "warnings": [...]}
where warnings are the SDK's own log records at WARNING or above (a refused DELETE logs
"Session termination failed: <status>"); the exit status is non-zero on any failure.
"""

import asyncio
import json
import logging
import sys

from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

warnings: list[str] = []


class Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        warnings.append(f"{record.name}: {record.getMessage()}")


async def main(url: str) -> None:
    logging.getLogger().addHandler(Collect(level=logging.WARNING))
    async with streamable_http_client(url) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            initialized = await session.initialize()
            listed = [tool.name for tool in (await session.list_tools()).tools]
            await session.call_tool("kv_set", {"key": "py-sdk", "value": "through the Python SDK"})
            read_back = await session.call_tool("kv_get", {"key": "py-sdk"})
    print(
        json.dumps(
            {
                "protocol": str(initialized.protocol_version),
                "listed": listed,
                "written": read_back.content[0].text,
                "warnings": warnings,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(sys.argv[1]), timeout=30))
