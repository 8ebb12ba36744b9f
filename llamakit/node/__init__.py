"""The llamakit node: an aiohttp server around llama-cpp-python that takes work only from its router."""

from llamakit.node.settings import NodeSettings, settings_from_args

__all__ = ["NodeSettings", "create_app", "settings_from_args"]


def __getattr__(name: str) -> object:
    # create_app pulls in llama_cpp; keep `import llamakit.node` cheap for settings and tooling.
    if name == "create_app":
        from llamakit.node.app import create_app

        return create_app
    raise AttributeError(name)
