"""Around the service, never imported by it: the command-line client, the stream client, local
clusters for tests and benchmarks, the KubeRay manifest generator."""
