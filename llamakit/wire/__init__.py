"""Wire types that the node, the router and the SDK share, with no aiohttp: OpenAI's request and response shapes
(`completions` for chat and text completions, `responses`, `embeddings`, `tool_calls`), the error body
(`errors`) and the node↔router contract (`node`)."""
