"""Alacrity: a virtual I/O bus for KVM virtual machines."""

__version__ = "0.1.0"
