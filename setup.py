"""Packaging for gsmail: the all-in-one mail server for GroupServer."""

from setuptools import setup

setup(
    name="gsmail",
    version="0.1.0",
    description="A Twisted mail server (ESMTP, LMTP) that adds mail to GroupServer groups",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # twisted/plugins is a namespace-less plugin directory: find_packages()
    # cannot see it, and it must not get an __init__.py.
    packages=["gsmail", "gsmail.inbound", "gsmail.outbound", "twisted.plugins"],
    package_data={"gsmail": ["py.typed"], "twisted.plugins": ["gsmail_plugin.py"]},
    install_requires=[
        "Twisted[tls]>=24.7.0",
        "treq>=23.11.0",
        "service-identity>=24.1.0",
        "attrs>=23.1.0",
        "multipart>=1.0.0",
        "idna>=3.0",
        "hyperlink>=21.0.0",
        "flufl.bounce>=4.0",
    ],
    entry_points={
        "console_scripts": [
            "gsmail-queue = gsmail.queuectl:main",
            "gsmail-tlsrpt = gsmail.outbound.tlsrpt:main",
            "smtp2gs = gsmail.script:main",
        ]
    },
    extras_require={
        "test": ["hypothesis>=6.0"],
        "dev": ["hypothesis>=6.0", "mypy>=1.10", "mypy-zope>=1.0.5", "ruff>=0.5"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Email :: Mail Transport Agents",
    ],
)
