"""Packaging for gsmail: the all-in-one mail server for GroupServer."""

import re

from setuptools import setup


def _version() -> str:
    """gsmail.__version__, read without importing gsmail (its dependencies may be missing)."""
    with open("gsmail/__init__.py", encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    assert match is not None, "no __version__ in gsmail/__init__.py"
    return match.group(1)


setup(
    name="gsmail",
    version=_version(),
    description="A Twisted mail server (ESMTP, LMTP) that adds mail to GroupServer groups",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author="The gsmail contributors",
    license="ZPL-2.1",
    license_files=["LICENSE"],
    url="https://groupserver.org/",
    project_urls={"GroupServer": "https://groupserver.org/"},
    keywords=["GroupServer", "mail", "MTA", "SMTP", "LMTP", "Twisted", "mailing list"],
    python_requires=">=3.11",
    # twisted/plugins is a namespace-less plugin directory: find_packages()
    # cannot see it, and it must not get an __init__.py.
    packages=[
        "gsmail",
        "gsmail.inbound",
        "gsmail.outbound",
        "gsmail.config",
        "gsmail.groupserver",
        "gsmail.inbound.authresults",
        "gsmail.inbound.protocol",
        "gsmail.inbound.routing",
        "gsmail.ledger",
        "gsmail.metrics",
        "gsmail.outbound.client",
        "gsmail.outbound.delivery",
        "gsmail.outbound.dsn",
        "gsmail.outbound.mtasts",
        "gsmail.outbound.queue",
        "gsmail.routes",
        "gsmail.script",
        "gsmail.service",
        "gsmail.standin",
        "twisted.plugins",
    ],
    package_data={"gsmail": ["py.typed"], "twisted.plugins": ["gsmail_plugin.py"]},
    install_requires=[
        # Upper bound: gsmail reaches into Twisted's private parts, each
        # behind an adapter in gsmail/twistedcompat.py: idle_tcp_connection
        # (tcp.Connection._writeDisconnected/_tempDataBuffer, eager.py),
        # adopt_unix_port (unix.Port._fromListeningDescriptor/_bindPath,
        # workers.py), set_connection_factory (HTTPConnectionPool._factory;
        # and _HTTP11ClientFactory, groupserver.py), IOpenSSLTrustRoot, and
        # for service.py, service/listeners.py, check.py, outbound/mtasts.py,
        # reload.py and standin/http.py raise_listen_errors, waiting_for_port,
        # stop_resolv_conf_timer, add_trust_root, log_observers/log_file_of
        # and request_path. tests/test_twistedcompat.py fails when one is
        # gone. Tested with 24.7 to 26.10; raise the bound after that test
        # passes on the new release.
        "Twisted[tls]>=24.7.0,<27",
        "treq>=23.11.0",
        "service-identity>=24.1.0",
        "attrs>=23.1.0",
        "multipart>=1.0.0",
        "idna>=3.0",
        "hyperlink>=21.0.0",
        "flufl.bounce>=4.0",
        # The Sender Rewriting Scheme of forward routes (gsmail.inbound.routing).
        "srslib>=0.1.5,<0.2",
        # nntp routes: nntplib left the standard library in Python 3.13.
        "standard-nntplib>=3.13; python_version >= '3.13'",
        # DKIM signing, ARC, and the authentication checks of inbound mail
        "dkimpy>=1.1.5",
        "cryptography>=41.0",  # key files (gsmail.signing); also under Twisted[tls]
        "authres>=1.2.0",
        "PyNaCl>=1.5",
        "dnspython>=2.4",
        "pyspf>=2.0.14",
        "publicsuffixlist>=1.0",
        # The metrics endpoint (gsmail.metrics; metrics_endpoint).
        "prometheus-client>=0.17",
    ],
    entry_points={
        "console_scripts": [
            "gsmail-check = gsmail.check:main",
            "gsmail-queue = gsmail.queuectl:main",
            "gsmail-dkim = gsmail.dkimtool:main",
            "gsmail-report = gsmail.report:main",
            "gsmail-tlsrpt = gsmail.outbound.tlsrpt:main",
            "smtp2gs = gsmail.script:main",
        ]
    },
    extras_require={
        "test": ["hypothesis>=6.0", "packaging>=21"],
        "dev": [
            "hypothesis>=6.0",
            "packaging>=21",
            "mypy>=1.10",
            "mypy-zope>=1.0.5",
            "ruff>=0.5",
        ],
    },
    classifiers=[
        "Development Status :: 4 - Beta",
        "Environment :: No Input/Output (Daemon)",
        "Framework :: Twisted",
        "Intended Audience :: System Administrators",
        "License :: OSI Approved :: Zope Public License",
        # Linux only: epoll, /proc, prctl(PR_SET_PDEATHSIG), sd_notify.
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Topic :: Communications :: Email :: Mail Transport Agents",
        "Topic :: Communications :: Email :: Mailing List Servers",
        "Typing :: Typed",
    ],
)
