# make run  — install what is missing, start a local Redis if none answers, run the server.
# make test — install what is missing, then every check: fmt, clippy, rustdoc, unit and
#             integration tests (real redis-server), and each client's tests
#             (Python, Node.js, Ruby, shell) against a real server.
# make bench — the benchmark table (BENCH.md): every client's W1/W2, W3, W4, CPU per round trip.

REDIS_URL ?= $(or $(CERBAS_REDIS_URL),redis://127.0.0.1:6379)
BIN := $(CURDIR)/target/debug/cerbas

.PHONY: run test setup lint rust-tests bin client-tests python-tests node-tests ruby-tests sh-tests bench bench-micro clean

run:
	./scripts/setup.sh
	./scripts/redis-up.sh "$(REDIS_URL)"
	cargo build --release
	./target/release/cerbas --config cerbas.toml --crontab CRONTAB --redis "$(REDIS_URL)"

test: setup lint rust-tests client-tests

setup:
	./scripts/setup.sh --clients

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps

rust-tests:
	cargo test

bin:
	cargo build

client-tests: python-tests node-tests ruby-tests sh-tests

python-tests: bin
	CERBAS_BIN=$(BIN) .venv/bin/python -m pytest -q clients/python

node-tests: bin
	cd clients/node && CERBAS_BIN=$(BIN) npm test

ruby-tests: bin
	cd clients/ruby && CERBAS_BIN=$(BIN) ruby -Ilib -Itest test/test_cerbas_client.rb

sh-tests: bin
	CERBAS_BIN=$(BIN) bash clients/sh/test.sh

# One table: W1/W2 per shipped client with client, server and Redis CPU per
# round trip, W3, W4, RSS, next to same-run baselines and the protocol floor
# (examples/floor.rs, a yardstick; BENCH.md keeps the latest).
bench: setup
	cargo build --release --bin cerbas --example loadgen --example clientbench --example floor
	.venv/bin/python scripts/bench.py

# criterion: the protocol's hot path (parse a request, encode a reply).
bench-micro:
	cargo bench --bench protocol

clean:
	cargo clean
	rm -rf .venv .redis clients/node/node_modules
