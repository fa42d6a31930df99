"""Sharded targets: loading into models whose parameters are DTensors, each rank reading only its part."""
