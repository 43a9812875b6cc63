//! Benchmarks (hop, mesh, sweep, control) land with the benchmarks issue; they build on the local
//! mesh of `meshaccel-e2e` (`SidecarMesh`) and print ratios measured in one run.
