"""
The inbound side: ESMTP and LMTP receivers over one shared delivery core.
"""

__all__: list[str] = []
