module meshaccel/e2e/conformance/go

go 1.19
