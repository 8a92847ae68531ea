# make run  — install what is missing, start a local Redis if none answers, run the server.
# make test — install what is missing, then every check: fmt, clippy, unit and
#             integration tests (real redis-server), the Python client's tests.

REDIS_URL ?= $(or $(CERBAS_REDIS_URL),redis://127.0.0.1:6379)

.PHONY: run test setup lint rust-tests python-tests bench clean

run:
	./scripts/setup.sh
	./scripts/redis-up.sh "$(REDIS_URL)"
	cargo build --release
	./target/release/cerbas --config cerbas.toml --crontab CRONTAB --redis "$(REDIS_URL)"

test: setup lint rust-tests python-tests

setup:
	./scripts/setup.sh --python

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

rust-tests:
	cargo test

python-tests:
	cargo build
	CERBAS_BIN=$(CURDIR)/target/debug/cerbas .venv/bin/python -m pytest -q clients/python

bench:
	cargo bench --bench protocol

clean:
	cargo clean
	rm -rf .venv .redis
