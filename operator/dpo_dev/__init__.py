"""Development tools, not shipped in either image: the local control plane, the node simulator, the local Hub,
image builds and the demo. Tests, benchmarks and the README demo use them."""
