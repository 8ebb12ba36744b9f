from tests.sdk.conftest import LiveRouter, live_router, loop_thread

__all__ = ["LiveRouter", "live_router", "loop_thread"]
