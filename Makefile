# Set-up and everyday commands. Every target that needs the venv makes it,
# installing the Debian packages it needs first when they are missing.

PYTHON := /usr/bin/python3
VENV := .venv
DEV := .dev
# libxml2-dev: the oVirt SDK (ovirt-engine-sdk-python, an sdist) compiles
# a small C extension against it; pycurl comes from a wheel.
SYSTEM_PACKAGES := qemu-utils qemu-block-extra python3-libnbd libnbd-bin nbdkit python3-venv \
	curl openssl gcc python3-dev rpm libxml2-dev
# The proxy's signed tickets (ovirt_imageio/signed.py) and their tests.
SYSTEM_PACKAGES += python3-cryptography
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# The side-by-side benchmark harness (shared/bench/README.md) and its
# options, e.g. make bench BENCH_ARGS="--scenarios download --runs 5".
BENCH := ../shared/bench
BENCH_ARGS ?=
# make dist writes the sdist (the RPMs' source) here; make rpm builds the
# RPMs under RPM_TOPDIR and copies them here too. RPMBUILD_ARGS: --nodeps,
# since Debian's rpm database knows none of the spec's BuildRequires.
DIST := dist
VERSION := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml)
SDIST := $(DIST)/ovirt_imageio-$(VERSION).tar.gz
RPM_TOPDIR := $(CURDIR)/build/rpmbuild
RPMBUILD_ARGS ?= --nodeps
# The page's tests (test/http/page_test.py) run chromium headless through
# chromium-driver; certutil (libnss3-tools) makes their browser profile's
# trusted CAs.
SYSTEM_PACKAGES += chromium chromium-driver libnss3-tools

.PHONY: check stress demo run bench venv system-packages clean dist rpm

check: venv
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The long runs, outside make check's time: the property tests with the
# stress hypothesis profile (test/properties.py), the fuzzer for
# IMAGEIO_FUZZ_SECONDS and the load test for IMAGEIO_LOAD_SECONDS, each
# printing its figures. -m overrides pyproject's "not stress".
STRESS_TESTS := test/fuzz_test.py test/load_test.py \
	$(wildcard test/*_property_test.py test/*/*_property_test.py)
IMAGEIO_FUZZ_SECONDS ?= 600
IMAGEIO_LOAD_SECONDS ?= 120

stress: venv
	IMAGEIO_STRESS=1 IMAGEIO_FUZZ_SECONDS=$(IMAGEIO_FUZZ_SECONDS) \
		IMAGEIO_LOAD_SECONDS=$(IMAGEIO_LOAD_SECONDS) \
		$(VENV)/bin/python -m pytest -m "stress or not stress" \
		--timeout 0 $(STRESS_TESTS) $(PYTEST_ARGS)

# The main job end to end, through ovirt-img: the daemon and the engine
# simulator start, a sample qcow2 goes up with ovirt-img upload-disk and
# comes back with download-disk (checksums verified, qemu-img compare),
# and everything stops.
demo: venv
	$(VENV)/bin/python dev/demo $(DEV)

run: venv
	dev/mkconf $(DEV)
	$(VENV)/bin/ovirt-imageio --conf-dir $(DEV)/conf

# compare runs from the project root: its default daemon A is
# ./.venv/bin/ovirt-imageio. The anchor venv (daemon B, the clients) is made
# first by test/upstream.py, under the same lock the tests take. bench/setup
# checks the venv with `python -` (cwd first on sys.path), where our
# ovirt_imageio would shadow upstream's; PYTHONSAFEPATH keeps cwd off it.
# BENCH_ARGS stays unquoted: it holds several options, or none.
bench: venv
	@if [ -x $(BENCH)/compare ]; then \
		anchor=$$($(VENV)/bin/python test/upstream.py | tail -n 1) && \
		BENCH_ANCHOR_VENV="$$anchor" PYTHONSAFEPATH=1 \
			$(BENCH)/compare $(BENCH_ARGS); \
	else \
		echo "make bench: no benchmark harness at $(BENCH)/compare;" \
			"it is not part of this repository. Check out the shared" \
			"tree next to it, or set BENCH=/path/to/shared/bench." >&2; \
		exit 1; \
	fi

# The sdist, from the working tree: the package and what the spec needs
# (MANIFEST.in). Offline: the venv's setuptools builds it.
dist: venv
	rm -f $(SDIST)
	$(VENV)/bin/python -m build --sdist --no-isolation --outdir $(DIST) .

# The RPMs (ovirt-imageio-common, -daemon, -client; noarch), built from the
# sdist and the spec inside it. The venv's Python runs pip and setuptools;
# the installed commands run /usr/bin/python3. No python3.Xdist() provides:
# Debian's rpm generates them with a /usr/bin/python3 lacking packaging.
rpm: dist
	rm -rf $(RPM_TOPDIR)
	mkdir -p $(RPM_TOPDIR)/SOURCES
	cp $(SDIST) $(RPM_TOPDIR)/SOURCES/
	rpmbuild -tb $(RPMBUILD_ARGS) \
		--define "_topdir $(RPM_TOPDIR)" \
		--define "__pythondist_provides %{nil}" \
		--define "__pythondist_requires %{nil}" \
		--define "python3 $(abspath $(VENV))/bin/python" \
		$(SDIST)
	cp $(RPM_TOPDIR)/RPMS/noarch/*-$(VERSION)-*.noarch.rpm $(DIST)/
	@ls -1 $(DIST)/*-$(VERSION)-*.noarch.rpm

venv: system-packages $(VENV)/.installed

# Install only what is missing, so a machine that has everything does not
# need apt at all.
system-packages:
	@missing=""; \
	for p in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" \
			|| missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "Installing system packages:$$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $$missing; \
	fi

# The venv is made from the system Python with its site packages, so that
# libnbd's bindings (python3-libnbd) import.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) $(DEV) build dist *.egg-info .pytest_cache
