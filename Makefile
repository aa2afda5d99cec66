# Set-up and everyday commands. Every target that needs the venv makes it,
# installing the Debian packages it needs first when they are missing.

PYTHON := /usr/bin/python3
VENV := .venv
DEV := .dev
SYSTEM_PACKAGES := qemu-utils python3-libnbd libnbd-bin nbdkit python3-venv \
	curl openssl
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: check run venv system-packages clean

check: venv
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

run: venv
	dev/mkconf $(DEV)
	$(VENV)/bin/ovirt-imageio --conf-dir $(DEV)/conf

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
