"""Quorum's command-line and Python client for data scientists and stewards (docs/cli.md).

It talks to the server's REST API (/api/v1/) with an API token, using only the standard library
for HTTP; it never imports the server's code (Django, Channels, Celery, federation, dashboard).
Plans are checked locally with the same plan language as the server (fedcore.plan), and steward
approvals are signed with fedcore.approvals, as ``quorum-agent steward-key sign`` does.
"""

from quorum.client import Client, Download, QuorumError

__all__ = ["Client", "Download", "QuorumError"]
