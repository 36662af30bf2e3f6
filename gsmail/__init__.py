"""
gsmail: one Twisted process that receives mail for GroupServer groups (ESMTP
and LMTP) and adds each message to its group exactly once.
"""

__all__: list[str] = []
