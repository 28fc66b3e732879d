from setuptools import find_packages, setup

setup(
    name="mta-server",
    version="0.1.0",
    description="A mail transfer agent for mail behind load balancers (PROXY protocol) "
                "and sending through pools of SOCKS5 proxies",
    python_requires=">=3.11",
    packages=find_packages(include=["mta", "mta.*", "workers", "workers.*", "shared", "shared.*"]),
    install_requires=[
        "gevent>=23.9",
        "python-prctl>=1.8",
        "msgpack>=1.0",
        "dnspython>=2.4",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "trustme>=1.1", "cryptography>=41"],
        "bench": ["matplotlib>=3.7", "py-spy>=0.3"],
    },
    entry_points={"console_scripts": ["mta-server = workers.cli:main"]},
)
