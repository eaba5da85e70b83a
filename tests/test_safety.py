"""The network-safety rules hold for the test process itself."""
import socket

import pytest


def test_tests_cannot_reach_a_metadata_address():
    for address in ("100.100.100.200", "169.254.169.254"):
        with pytest.raises(AssertionError, match="metadata address"):
            socket.create_connection((address, 80), timeout=0.1)
