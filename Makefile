# keybroker: `make demo` runs the main job; `make test` runs every test and
# does all the set-up those tests need.
.PHONY: demo deps test lint

demo:
	go run ./cmd/keybroker demo

deps:
	bash scripts/deps.sh

test: deps
	bash scripts/test.sh

lint:
	bash scripts/lint.sh

# bench: keybroker against Tink, go-kms-wrapping, localsecrets, per-secret
# key-service calls and pgcrypto; writes docs/BENCHMARKS.md (section
# Contenders) and docs/benchmarks.svg. BENCHFLAGS=-quick for a short run.
.PHONY: bench
bench: deps
	cd bench && go run ./cmd/kbbench $(BENCHFLAGS)
