"""
The outbound side: GroupServer's own mail leaves through gsmail, durably
queued, with VERP per recipient and TLS (see docs/outbound.md).
"""

__all__: list[str] = []
