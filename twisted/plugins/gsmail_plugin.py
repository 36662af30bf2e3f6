"""
The C{twistd gsmail} plugin. It imports L{gsmail.tap} only when used, so
C{twistd --help} stays fast.
"""

from twisted.application.service import ServiceMaker

gsmail = ServiceMaker(
    "gsmail",
    "gsmail.tap",
    "Receive mail for GroupServer over ESMTP and LMTP, and add it to groups exactly once.",
    "gsmail",
)
