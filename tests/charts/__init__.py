"""Tests of the Helm chart (helm lint and helm template only: no cluster)."""
