"""The plugin's benchmarks. Run each from the repository root as a module, e.g.
`python -m benchmarks.tofu_mini.run --help`."""
