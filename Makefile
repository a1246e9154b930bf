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
