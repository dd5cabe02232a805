# Conveniences; dev.py needs nothing but Python 3.11+.
PYTHON ?= python3

.PHONY: test demo bench clean
test:
	$(PYTHON) dev.py test
demo:
	$(PYTHON) dev.py demo
bench:
	$(PYTHON) dev.py bench
clean:
	rm -rf .venv build dist *.egg-info
