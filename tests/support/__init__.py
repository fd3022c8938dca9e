"""What only the tests use: the cluster fixture helper (skips or fails when the binaries are
missing), the image build, PromQL names, RPC and status helpers, servicers served without the
whole server. The private services both the tests and the benchmarks need (Redis servers and
clusters, certificates, child processes, the mixed load) are in :mod:`pricing_testing`."""
