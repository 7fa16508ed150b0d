"""Python client for a loraserve server."""
