# mta-server: `make run` starts the server on etc/mta.conf, `make test` runs the suite.
# Both install what they need on a Debian 12 machine (as root) and are quick the second time.

# Debian's own Python: the workers drop root, and must still be able to read
# the standard library (an interpreter under /root would be out of their reach).
PYTHON  ?= /usr/bin/python3
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
APT_RUN := libcap-dev python3-venv python3-dev gcc
APT_TEST := swaks postfix haproxy dante-server microsocks

.PHONY: run test bench fuzz check clean

run: .stamp-venv .stamp-user
	$(VENV)/bin/mta-server start --foreground -C etc/mta.conf

test: .stamp-venv-test .stamp-user
	$(PY) -m pytest -q tests

bench: .stamp-venv-test .stamp-user
	$(PIP) install -q -e '.[bench]'
	$(PY) bench/smtp_throughput.py --through-haproxy --plot var/bench/throughput.png

fuzz: .stamp-venv-test
	$(PY) bench/proxy_parser.py --fuzz 1000000

check: .stamp-venv
	$(VENV)/bin/mta-server check-config -C etc/mta.conf

.stamp-apt-run:
	@dpkg -s $(APT_RUN) >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_RUN); }
	touch $@

# Postfix is installed for its smtp-source/smtp-sink only: no configuration,
# and its own daemon is stopped and disabled so it never takes a port.
.stamp-apt-test: .stamp-apt-run
	@dpkg -s $(APT_TEST) >/dev/null 2>&1 || { \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_TEST); }
	-@systemctl disable --now postfix >/dev/null 2>&1; service postfix stop >/dev/null 2>&1; true
	-@service danted stop >/dev/null 2>&1; service haproxy stop >/dev/null 2>&1; true
	touch $@

.stamp-venv: .stamp-apt-run setup.py
	@if [ -x $(PY) ] && [ "$$($(PY) -c 'import sys; print(sys.base_prefix)')" != "$$($(PYTHON) -c 'import sys; print(sys.base_prefix)')" ]; then \
	  echo "recreating $(VENV) with $(PYTHON)"; rm -rf $(VENV); fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e .
	touch $@

.stamp-venv-test: .stamp-venv .stamp-apt-test
	$(PIP) install -q -e '.[test]'
	touch $@

# The unprivileged user the workers run as (exim_user in etc/mta.conf).
.stamp-user:
	@id mta >/dev/null 2>&1 || { [ "$$(id -u)" != 0 ] || useradd --system --no-create-home --shell /usr/sbin/nologin mta; }
	touch $@

clean:
	rm -rf var .stamp-* build *.egg-info
