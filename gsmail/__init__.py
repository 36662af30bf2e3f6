"""
gsmail: one Twisted process that receives mail for GroupServer groups (ESMTP
and LMTP) and adds each message to its group exactly once.
"""

__all__ = ["__version__"]

#: gsmail's version (PEP 440), as packaged (setup.py reads it from here).
__version__ = "0.1.0"
