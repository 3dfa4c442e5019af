"""Tests of the local development stack: control plane, node simulator, Hub."""
