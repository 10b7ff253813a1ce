"""The echo tool on FastMCP, Streamable HTTP. Usage: python server.py [PORT]   (endpoint: /mcp)"""

import sys

from fastmcp import FastMCP

mcp = FastMCP("echo-python")


@mcp.tool
def echo(text: str) -> str:
    """Send the text back."""
    return text


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8093
    mcp.run(
        transport="http", host="127.0.0.1", port=port, path="/mcp", log_level="warning", show_banner=False
    )
