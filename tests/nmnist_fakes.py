"""Tiny N-MNIST data sets in both on-disk formats, for tests that must not download anything (tools.fakedata)."""
from tools.fakedata import (MAX_TS, encode_event, make_nmnist_tree, random_events, write_bin,  # noqa: F401
                            write_raw_tree)
