"""Tests of the agent_worker package against a real redis-server, worker and test agent.

They are run by the Rust harness ``tests/python_client.rs`` (``cargo xtask test``), which
starts Redis and the worker and passes where they are in the environment (see ``_env.py``).
"""
