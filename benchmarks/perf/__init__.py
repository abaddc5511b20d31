"""What each method costs per training step against GradDiff (`python -m benchmarks.perf.perf`)."""
