"""A module that sets an asyncio event loop when imported (a preload to refuse)."""

import asyncio

asyncio.set_event_loop(asyncio.new_event_loop())
