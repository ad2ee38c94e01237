"""Quorum site agent: trains on a site's local data and talks to the consortium server.

Entry points:

- ``quorum-agent`` / ``python -m clientagent`` (:mod:`clientagent.cli`)
- :func:`clientagent.connection.run_agent`: the session loop with reconnect, as a coroutine
- :func:`clientagent.trainer.handle_task`: one training task, without any network

The agent never imports Django, never unpickles and never runs code sent by the server: models
are built from declarative specs only (:func:`fedcore.models.build_model`).
"""

__version__ = "0.1.0"
